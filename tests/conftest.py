import os

# Nothing in the tests may reach a model hub: a stray download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402  (the environment above is set before anything imports torch)


@pytest.fixture(scope="module", autouse=True)
def torch_threads_restored():
    """A test module must leave torch's thread count as it found it: the reliability tests compare in-process runs
    with subprocesses started with OMP_NUM_THREADS, and one leaked set_num_threads(1) made them differ."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, f"this test module left torch at {after} threads (it found {before})"


@pytest.fixture
def one_thread():
    """One torch thread: the same in this process and in the subprocesses a test starts (exact resume)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """64 SynthScenes training images at 32 px in 2 shards, shared by the engine tests."""
    from clipforge.data.generate import generate_synth_shards

    folder = tmp_path_factory.mktemp("tiny_shards")
    generate_synth_shards(folder, num=64, split="train", image_size=32, shard_size=32)
    return folder
