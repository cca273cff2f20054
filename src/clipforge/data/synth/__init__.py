"""SynthScenes: a seeded, procedural generator of image-text data with every annotation clipforge uses.

See docs/synthscenes.md for the attributes, the base/novel class split, captions, relations, documents
and variants, and the record schema.
"""

from clipforge.data.synth.attributes import (
    BACKGROUNDS,
    BASE_CLASSES,
    CLASSNAMES,
    COLOR_RGB,
    COLORS,
    FILLS,
    NOVEL_CLASSES,
    SHAPES,
    SIZES,
    SPLITS,
    VARIANTS,
    class_attributes,
    class_label,
    is_novel,
)
from clipforge.data.synth.captions import RELATIONS, object_phrase, spatial_relation
from clipforge.data.synth.generator import SynthScenes, encode_png, render_documents
from clipforge.data.synth.render import Drawing, DrawnObject
from clipforge.data.synth.scene import Scene, SceneObject

__all__ = [
    "BACKGROUNDS",
    "BASE_CLASSES",
    "CLASSNAMES",
    "COLORS",
    "COLOR_RGB",
    "Drawing",
    "DrawnObject",
    "FILLS",
    "NOVEL_CLASSES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneObject",
    "SynthScenes",
    "VARIANTS",
    "class_attributes",
    "class_label",
    "encode_png",
    "is_novel",
    "object_phrase",
    "render_documents",
    "spatial_relation",
]
