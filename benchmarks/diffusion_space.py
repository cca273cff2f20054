"""Latent against pixel space for the embedded diffusion model, on this machine, both sides in the same run:
training-step time, sampling cost, and what training each costs in total.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/diffusion_space.py          # ~2 min on 2 CPU cores
    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/diffusion_space.py --quick  # a ~30 s smoke run
    .venv/bin/python benchmarks/diffusion_space.py --vae-steps 3000 --unet-steps 8000 --batch-sizes 32 64 128

The sides, random weights (timing does not depend on them) of the embedded architecture (genie_edits.py holds
its configs):

- (a) pixel space: the UNet2DConditionModel at sample_size 32 over 3 channels, on 32 px images;
- (b) latent space: the same UNet at sample_size 16 over the VAE's 4 latent channels, on 16 x 16 x 4 latents,
  plus the AutoencoderKL's encode (every training step, unless the latents are cached) and decode (sampling);
- (c) the AutoencoderKL's own training step at 32 px: L1 reconstruction + 1e-6 KL on a posterior sample (no
  perceptual or adversarial term).

A UNet training step is Stable Diffusion's objective: noise the batch (random data) at uniform timesteps of the
DDPM schedule (scaled-linear betas 0.00085..0.012, 1000 steps), predict the noise, MSE; forward + backward +
AdamW (fused, as the training loop's) via benchmarks/_measure.timed_training_step. Text states are random
[B, 48, 128] tensors: the frozen text encoder's output, precomputed, so its forward is not in the step.
Sampling: one UNet call on a classifier-free-guidance batch (2 x 64 rows: unconditional and conditional) times
16 steps (the solver's own update is negligible beside it), plus the VAE decode of the 64 latents for (b);
GeNIe edits encode the 64 sources too ("VAE encode").

Measurement (genie_edits.measure): every side built first, called once as a warm-up, then --repeats rounds of
all sides in turn; the median wall time and process CPU time. Memory is read during the warm-up call: glibc's
malloc_trim first hands back what earlier sides freed, then VmHWM is reset (/proc/self/clear_refs) and read
after the call (benchmarks/_measure.rss_mib): "peak RSS" includes every model of the run (all stay loaded),
"+MiB" is the call's own rise above the RSS it started at. The totals multiply the measured step times by the
step counts: "wall min" at --threads threads, "CPU min" in process CPU time (the sum over threads).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from _measure import timed_training_step
from genie_edits import (
    EMBEDDED_UNET,
    EMBEDDED_VAE,
    SD_BETAS,
    TEXT_TOKENS,
    PeakMemory,
    machine_line,
    measure,
    print_table,
    unet_config,
)

SAMPLES, SAMPLE_STEPS = 64, 16  # one sampling batch: 64 samples, 16 solver steps, CFG
KL_WEIGHT = 1e-6  # Stable Diffusion's autoencoder (the value does not change the cost)


class DenoisingLoss:
    """Epsilon-prediction MSE at uniform timesteps: the UNet objective of Stable Diffusion."""

    def __init__(self, generator):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(**SD_BETAS)
        self.generator = generator

    def __call__(self, unet, batch):
        import torch

        clean, context = batch  # [B, C, h, w], [B, L, D]
        noise = torch.randn(clean.shape, generator=self.generator).to(clean.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  generator=self.generator).to(clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]
        return SimpleNamespace(total=torch.nn.functional.mse_loss(prediction, noise))

    def after_step(self, model) -> None:
        pass


class AutoencoderLoss:
    """L1 reconstruction of a posterior sample's decoding + KL_WEIGHT * KL(posterior || N(0, I))."""

    def __init__(self, generator):
        self.generator = generator

    def __call__(self, vae, images):
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(self.generator)).sample
        return SimpleNamespace(total=(reconstruction - images).abs().mean() + KL_WEIGHT * posterior.kl().mean())

    def after_step(self, model) -> None:
        pass


class Side:
    """One network with its optimiser and objective, the batches it trains on and the calls timed on it."""

    def __init__(self, network, objective, device, seed: int):
        import torch

        self.network = network.to(device).train()
        self.objective = objective
        self.device = device
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-4, fused=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.parameters = sum(p.numel() for p in self.network.parameters())

    def random(self, *shape):
        import torch

        return torch.randn(shape, generator=self.generator).to(self.device)

    def train_step(self, batch):
        return lambda: timed_training_step(self.objective, self.network, batch, self.optimizer, self.device)

    def inference(self, work):
        import torch

        def call():
            self.network.eval()
            try:
                with torch.inference_mode():
                    return work()
            finally:
                self.network.train()

        return call


def build_sides(device):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    make = torch.Generator().manual_seed
    pixel = Side(UNet2DConditionModel(**unet_config(32, 3)), DenoisingLoss(make(1)), device, 11)
    latent = Side(UNet2DConditionModel(**unet_config(16, EMBEDDED_VAE["latent_channels"])), DenoisingLoss(make(2)),
                  device, 12)
    vae = Side(AutoencoderKL(**EMBEDDED_VAE), AutoencoderLoss(make(3)), device, 13)
    return pixel, latent, vae


def work_items(pixel, latent, vae, batch_sizes: list[int]) -> dict:
    """{(what, side, batch): zero-argument call} for every measured call."""
    width, channels = EMBEDDED_UNET["cross_attention_dim"], EMBEDDED_VAE["latent_channels"]
    image, latent_side = EMBEDDED_VAE["sample_size"], EMBEDDED_VAE["sample_size"] // 2
    work = {}
    for batch in batch_sizes:
        context = pixel.random(batch, TEXT_TOKENS, width)  # [B, L, D]
        images = pixel.random(batch, 3, image, image).clamp(-1, 1)  # [B, 3, 32, 32]
        work[("train", "pixel", batch)] = pixel.train_step((images, context))
        work[("train", "latent", batch)] = latent.train_step(
            (latent.random(batch, channels, latent_side, latent_side), context))
        work[("train", "vae", batch)] = vae.train_step(images)
        work[("encode", "vae", batch)] = vae.inference(lambda images=images: vae.network.encode(images).latent_dist.mode())
    rows = 2 * SAMPLES  # the unconditional and the conditional half of a CFG batch
    guided_context = pixel.random(rows, TEXT_TOKENS, width)
    pixel_input = pixel.random(rows, 3, image, image)
    latent_input = latent.random(rows, channels, latent_side, latent_side)
    for side, network_input in (("pixel", pixel_input), ("latent", latent_input)):
        owner = pixel if side == "pixel" else latent
        work[("unet call", side, rows)] = owner.inference(
            lambda owner=owner, x=network_input: owner.network(x, 500, encoder_hidden_states=guided_context,
                                                               return_dict=False)[0])
    sources = pixel.random(SAMPLES, 3, image, image).clamp(-1, 1)
    work[("encode", "vae", SAMPLES)] = vae.inference(lambda: vae.network.encode(sources).latent_dist.mode())
    latents = latent.random(SAMPLES, channels, latent_side, latent_side)
    work[("decode", "vae", SAMPLES)] = vae.inference(lambda: vae.network.decode(latents).sample)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="training batch of the main table and totals")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64], help="growth table")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps in the totals")
    parser.add_argument("--unet-steps", type=int, default=4000, help="UNet training steps in the totals")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run: batch 16 only, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.batch_sizes, args.repeats = 16, [16], 1
    batch_sizes = sorted({args.batch_size, *args.batch_sizes})

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(machine_line(args.threads, device))
    memory = PeakMemory(device)
    print(f"random weights, the embedded architecture; device {args.device}; median of {args.repeats} round(s) "
          f"after a warm-up, every side interleaved; peak RSS: {memory.describe()}\n")

    pixel, latent, vae = build_sides(device)
    found = measure(work_items(pixel, latent, vae, batch_sizes), args.repeats, memory)

    def wall(*key) -> float:
        return found[key]["wall"]

    def cpu(*key) -> float:
        return found[key]["cpu"]

    def mib(*key) -> list[str]:
        record = found[key]
        return [f"{record['rss']:.0f}", f"{record['rise']:.0f}"] + ([f"{record['gpu']:.0f}"] if cuda else [])

    batch, rows = args.batch_size, 2 * SAMPLES
    sample_pixel = SAMPLE_STEPS * wall("unet call", "pixel", rows)
    sample_latent = SAMPLE_STEPS * wall("unet call", "latent", rows) + wall("decode", "vae", SAMPLES)
    latent_encoded = wall("train", "latent", batch) + wall("encode", "vae", batch)
    memory_columns = ["train (encode) peak RSS MiB", "+MiB"] + (["GPU MiB"] if cuda else [])
    print(f"Training step at batch {batch}; sampling {SAMPLES} samples with CFG at {SAMPLE_STEPS} steps:\n")
    print_table(
        ["side", "parameters", "train s / step", "train samples/s", "sample s / 64", "sample samples/s",
         *memory_columns, "sample call peak RSS MiB", "sample call +MiB"],
        [["(a) pixel UNet, 32 x 32 x 3", f"{pixel.parameters / 1e6:.2f} M", f"{wall('train', 'pixel', batch):.3f}",
          f"{batch / wall('train', 'pixel', batch):.1f}", f"{sample_pixel:.2f}", f"{SAMPLES / sample_pixel:.1f}",
          *mib("train", "pixel", batch), *mib("unet call", "pixel", rows)[:2]],
         ["(b) latent UNet, 16 x 16 x 4", f"{latent.parameters / 1e6:.2f} M", f"{wall('train', 'latent', batch):.3f}",
          f"{batch / wall('train', 'latent', batch):.1f}", f"{sample_latent:.2f}", f"{SAMPLES / sample_latent:.1f}",
          *mib("train", "latent", batch), *mib("unet call", "latent", rows)[:2]],
         ["(b) + VAE encode of the batch", "", f"{latent_encoded:.3f}", f"{batch / latent_encoded:.1f}", "", "",
          *mib("encode", "vae", batch), "", ""],
         ["(c) VAE, 32 px (L1 + KL)", f"{vae.parameters / 1e6:.2f} M", f"{wall('train', 'vae', batch):.3f}",
          f"{batch / wall('train', 'vae', batch):.1f}", "", "", *mib("train", "vae", batch), "", ""]])
    print(f"\nVAE codec (inference): encode {batch} images {wall('encode', 'vae', batch):.3f} s, encode {SAMPLES} "
          f"{wall('encode', 'vae', SAMPLES):.3f} s, decode {SAMPLES} latents {wall('decode', 'vae', SAMPLES):.3f} s; "
          f"one CFG UNet call ({rows} rows): pixel {wall('unet call', 'pixel', rows):.3f} s, latent "
          f"{wall('unet call', 'latent', rows):.3f} s. Sampling, latent over pixel time: "
          f"{sample_latent / sample_pixel:.2f}")

    vae_steps, unet_steps = args.vae_steps, args.unet_steps
    plans = [
        ("pixel space", 0, wall("train", "pixel", batch), cpu("train", "pixel", batch)),
        ("latent, VAE encode every step", vae_steps, latent_encoded,
         cpu("train", "latent", batch) + cpu("encode", "vae", batch)),
        ("latent, latents cached", vae_steps, wall("train", "latent", batch), cpu("train", "latent", batch)),
    ]
    pixel_total = unet_steps * wall("train", "pixel", batch) / 60
    print(f"\nTotal to train at batch {batch}: VAE {vae_steps} steps (latent only) + UNet {unet_steps} steps "
          f"(cached latents: plus one encode pass over the data, not counted):\n")
    table = []
    for name, steps_of_vae, unet_wall, unet_cpu in plans:
        total_wall = (steps_of_vae * wall("train", "vae", batch) + unet_steps * unet_wall) / 60
        total_cpu = (steps_of_vae * cpu("train", "vae", batch) + unet_steps * unet_cpu) / 60
        table.append([name, steps_of_vae, unet_steps, f"{steps_of_vae * wall('train', 'vae', batch) / 60:.1f}",
                      f"{unet_steps * unet_wall / 60:.1f}", f"{total_wall:.1f}", f"{total_cpu:.1f}",
                      f"{total_wall / pixel_total:.2f}"])
    print_table(["plan", "VAE steps", "UNet steps", "VAE wall min", "UNet wall min", "total wall min",
                 "total CPU min", "x pixel"], table)

    print("\nTraining step by batch size (s / step; memory: peak RSS MiB, +MiB over the step's start):\n")
    table = []
    for size in batch_sizes:
        steps = {side: wall("train", side, size) for side in ("pixel", "latent", "vae")}
        encoded = steps["latent"] + wall("encode", "vae", size)
        table.append([size, f"{steps['pixel']:.3f}", f"{steps['latent']:.3f}", f"{encoded:.3f}",
                      f"{steps['vae']:.3f}", f"{steps['pixel'] / encoded:.2f}",
                      *[" / ".join(mib("train", side, size)) for side in ("pixel", "latent", "vae")]])
    print_table(["batch", "pixel s", "latent s", "latent + encode s", "VAE s", "pixel / (latent + encode)",
                 "pixel memory", "latent memory", "VAE memory"], table)


if __name__ == "__main__":
    main()
