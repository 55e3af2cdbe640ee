"""The peer of `sdlora bench --case step|forward`: the same model folder's U-Net in diffusers
(PyTorch f32, CPU), a peft LoRA of the same rank on to_q/k/v/out.0, AdamW, random latents; each
step timed, then one summary line in the same form as sdlora's.

    python tools/bench/peer_cpu_step.py MODEL_DIR step|forward RESOLUTION BATCH STEPS RANK
"""
import resource
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def main():
    model, case, res, batch, steps, rank = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(f"{model}/unet")
    unet.requires_grad_(False)
    cfg = unet.config
    train = case == "step"
    if train:
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    side = res // 8
    x = torch.randn(batch, cfg.in_channels, side, side)
    target = torch.randn(batch, cfg.out_channels, side, side)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim)
    t = torch.randint(0, 1000, (batch,))
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([[res, res, 0, 0, res, res]] * batch, dtype=torch.float32)
        added = {"text_embeds": torch.randn(batch, pooled), "time_ids": ids}
    print(f"{case}, {res} px, batch {batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        if train:
            pred = unet(x, t, ctx, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(pred, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                unet(x, t, ctx, added_cond_kwargs=added)
        s = time.perf_counter() - t0
        print(f"step {i + 1}: {s:.3f} s", flush=True)
        times.append(s)
    rest = sorted(times[1:] if len(times) > 1 else times)
    u = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"peer: median {rest[len(rest) // 2]:.3f} s, peak RSS {u.ru_maxrss / 1024:.0f} MiB, "
        f"minor faults {u.ru_minflt}, user {u.ru_utime:.1f} s, sys {u.ru_stime:.1f} s"
    )


if __name__ == "__main__":
    main()
