"""The peer of `sdlora generate` on the CPU: diffusers' StableDiffusionPipeline (PyTorch f32) on
the same model folder, same size, DDIM steps and guidance, one image. The random-weight folders
of `sdlora bench --write-model` carry no tokenizer, so the prompt is fixed CLIP token ids
encoded by the folder's text encoder (timed with the rest).

    python tools/bench/peer_cpu_generate.py MODEL_DIR SIZE STEPS CFG
"""
import resource
import sys
import time

T0 = time.time()
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402


def main():
    model, size, steps, cfg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(f"{model}/vae"),
        text_encoder=CLIPTextModel.from_pretrained(f"{model}/text_encoder"),
        tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(f"{model}/unet"),
        scheduler=DDIMScheduler.from_pretrained(f"{model}/scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    t1 = time.time()
    with torch.no_grad():
        ids = torch.randint(0, 49407, (2, 77))
        emb = pipe.text_encoder(ids).last_hidden_state
        image = pipe(
            prompt_embeds=emb[:1],
            negative_prompt_embeds=emb[1:],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            output_type="np",
        ).images[0]
    assert image.shape == (size, size, 3)
    u = resource.getrusage(resource.RUSAGE_SELF)
    print(f"peer: load {t1 - T0:.1f} s, generate {time.time() - t1:.1f} s, whole {time.time() - T0:.1f} s, peak RSS {u.ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
