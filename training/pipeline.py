"""The model a retraining fits: SimpleImputer -> StandardScaler -> LogisticRegression.

Owns `fit_pipeline` and the input matrix, in the order of the model's input names.

The pipeline is registered as an MLflow model (skops) and `freshet.models.export_sklearn` turns
it into the parameters serving scores with numpy, exactly as the fitted pipeline would.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def fit_pipeline(X: np.ndarray, y: np.ndarray, seed: int, C: float = 1.0, max_iter: int = 1000,
                 names: Sequence[str] | None = None):
    """The fraud pipeline, fitted; with `names`, on a frame of those columns, so the pipeline
    knows its inputs by name (MLflow's pyfunc hands it a DataFrame) and predicts the same."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([
        # keep_empty_features: a column empty in this window still counts as an input
        ("impute", SimpleImputer(strategy="mean", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("classify", LogisticRegression(C=C, max_iter=max_iter, random_state=seed)),
    ])
    if names is not None:
        X = pd.DataFrame(np.asarray(X, dtype=float), columns=list(names))
    return pipe.fit(X, y)


def input_column(name: str) -> str:
    """The training-set column of a model input.

    >>> input_column("card_txn_stats:count_amount_300s"), input_column("amount")
    ('card_txn_stats__count_amount_300s', 'amount')
    """
    view, sep, feature = name.partition(":")
    return f"{view}__{feature}" if sep else name


def input_matrix(df: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """The inputs `names` of every row of the training set, as floats; a column it lacks is all NaN."""
    cols = []
    for n in names:
        c = input_column(n)
        cols.append(pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) if c in df.columns
                    else np.full(len(df), np.nan))
    return np.column_stack(cols) if cols else np.zeros((len(df), 0))
