"""The peer on CPU: diffusers + peft training a LoRA on the same tiny model folder and images as
`sdlora train` (same steps, batch, rank, targets, resolution, lr, AdamW), timed as a whole
process and as the training loop alone. Prints one line: `peer: wall_s loop_s steps`.

    python tools/bench/peer_cpu_train.py MODEL_DIR DATA_DIR STEPS BATCH RANK
"""
import sys
import time

T0 = time.time()
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402
from pathlib import Path  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402
import numpy as np  # noqa: E402


def main():
    model, data, steps, batch, rank = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(f"{model}/unet")
    vae = AutoencoderKL.from_pretrained(f"{model}/vae")
    te = CLIPTextModel.from_pretrained(f"{model}/text_encoder")
    sched = DDPMScheduler.from_pretrained(f"{model}/scheduler")
    for m in (unet, vae, te):
        m.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    images = sorted(data.glob("*.png"))
    with torch.no_grad():
        px = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for p in images])
        lat = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
        # the tiny text encoder has CLIP's vocabulary; token ids need no tokenizer for timing
        ids = torch.randint(0, 49407, (len(images), 77))
        ctx = te(ids).last_hidden_state
    t1 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,))
        x0, c = lat[idx], ctx[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, c).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    loop = time.time() - t1
    print(f"peer: wall {time.time() - T0:.2f} s, loop {loop:.2f} s, {steps} steps, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
