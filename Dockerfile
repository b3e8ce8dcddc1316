# One image for every freshet component; the command picks the component.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Locked dependencies first, so code changes do not reinstall them.
COPY requirements.lock ./
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY freshet ./freshet
COPY stream ./stream
COPY serving ./serving
COPY monitor ./monitor
COPY training ./training
COPY feature_repo ./feature_repo
RUN uv pip install --system --no-cache --no-deps . \
 && useradd --system --uid 10001 --home /data freshet \
 && mkdir -p /data && chown freshet /data

USER freshet
ENV FRESHET_DATA_DIR=/data FRESHET_FEATURE_REPO=/app/feature_repo FRESHET_HTTP_HOST=0.0.0.0
ENTRYPOINT ["freshet"]
CMD ["--help"]
