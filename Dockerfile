# vae-hf on a CUDA PyTorch base. Build:  docker build -t vae-hf .
# Run:  docker run --gpus all -v $PWD/data:/data -v $PWD/outputs:/workspace/outputs \
#         -v hf-cache:/home/vae/.cache/huggingface vae-hf --config configs/celebahq_256.yaml data.dataset=/data
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/home/vae/.cache/huggingface \
    TORCH_HOME=/home/vae/.cache/torch

RUN useradd --create-home --uid 1000 vae
WORKDIR /workspace

COPY pyproject.toml README.md train_autoencoder.py ./
COPY vae_hf ./vae_hf
COPY configs ./configs
COPY assets ./assets
RUN pip install --no-cache-dir ".[deepspeed]" && chown -R vae:vae /workspace

USER vae
VOLUME ["/home/vae/.cache/huggingface"]
# The supervisor is PID 1: SIGTERM (docker stop, eviction) reaches every trainer process, and the container
# lives until they have saved their checkpoint (docs/resuming.md, "Stopping").
ENTRYPOINT ["vae-hf", "supervise", "--", "accelerate", "launch", "train_autoencoder.py"]
