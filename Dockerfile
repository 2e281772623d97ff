# One image for web and worker. Build the GPU flavour with:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t lorafold .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_IMPLICIT_TOKEN=1
WORKDIR /app
# gcc: the one-pass linear recipe kernel (worker/engine/recipe/linear_kernel.c) is compiled on first use for the
# host's CPU; without it the worker falls back to torch's eager ops (same bytes, ~1.5x slower)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 lorafold && mkdir /scratch && chown lorafold /scratch
COPY pyproject.toml README.md alembic.ini ./
COPY requirements ./requirements
COPY worker ./worker
COPY web ./web
COPY migrations ./migrations
COPY deploy ./deploy
RUN pip install --index-url "$TORCH_INDEX" torch \
 && pip install -e '.[worker,web]'
USER lorafold
EXPOSE 8000
# put a buffering proxy in front (compose.yaml's `proxy`, deploy/nginx.conf): slow clients stall gunicorn alone
CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "web:create_app()"]
