# syntax=docker/dockerfile:1
# MLflow tracking server image for deploy/mlflow.yaml.
#   docker build -f deploy/mlflow.Dockerfile -t registry.example.com/vipe-ray-mlflow:3.17.2 deploy
#
# mlflow==3.17.2 matches the client pinned in pyproject.toml's platform extra. psycopg2-binary is the
# PostgreSQL driver for the postgresql+psycopg2:// backend URI. Do not shorten that URI to postgresql://: with
# SQLAlchemy 2.1 it selects psycopg 3 ("No module named 'psycopg'"); to use psycopg 3 instead, install
# "psycopg[binary]" here and write postgresql+psycopg://. boto3 serves the s3:// artifact destination
# (deploy/mlflow.yaml); it reads the endpoint and credentials from the standard AWS_* variables.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true

RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9.9,<3" "boto3>=1.34,<2" \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
