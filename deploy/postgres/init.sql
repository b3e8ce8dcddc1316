-- The second database (the first, mlflow, is POSTGRES_DB): Feast's SQL registry.
CREATE DATABASE feast;
