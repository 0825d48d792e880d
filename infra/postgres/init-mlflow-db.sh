#!/bin/sh
# Runs once, when the postgres volume is new: the second database (MLflow's) beside the first (Prefect's).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE "${MLFLOW_DB:-mlflow}" OWNER "$POSTGRES_USER";
SQL
