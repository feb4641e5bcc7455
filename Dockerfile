FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY actors ./actors
COPY contract_dispatch ./contract_dispatch
COPY models ./models
COPY templates ./templates
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --create-home dispatch
USER dispatch
ENV DATA_DIR=/home/dispatch/.data
CMD ["contract-dispatch", "worker"]
