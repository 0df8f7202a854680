"""Clustering subjects by their regional lesion pattern (method part C, second half).

A subjects x regions load matrix is turned into standardised features (log, raw or
proportion of the subject's load), clustered with k-means, Ward or a Gaussian mixture, the
number of clusters is chosen by silhouette (and BIC for the mixture), stability is measured
by bootstrap ARI, and clusters are related to known participant data (group, age, sex).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from .errors import InputError

TRANSFORMS = ("log", "raw", "proportion")
METHODS = ("kmeans", "ward", "gmm")


def features(wide: pd.DataFrame, transform: str = "log", standardise: bool = True) -> pd.DataFrame:
    """Standardised features from a subjects x regions load matrix.

    ``log``: log(1 + load); ``raw``: the loads; ``proportion``: each region's share of the
    subject's total load (the pattern regardless of the amount; 0 for a subject without lesions).
    Columns that are constant across subjects carry no information and are dropped.
    """
    if transform not in TRANSFORMS:
        raise InputError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    values = wide.astype(float)
    if values.isna().any().any():
        raise InputError(
            f"load matrix has missing values for subjects {values.index[values.isna().any(axis=1)].tolist()[:10]}"
        )
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise InputError(
            f"load matrix has infinite values (subject {values.index[rows[0]]!r}, region "
            f"{values.columns[cols[0]]!r}, {int(bad.sum())} cells): fix the loads instead of dropping the region"
        )
    if (values < 0).any().any():
        raise InputError("load matrix has negative values")
    if transform == "log":
        values = np.log1p(values)
    elif transform == "proportion":
        total = values.sum(axis=1)
        values = values.div(total.where(total > 0, 1.0), axis=0)
    values = values.loc[:, values.std(axis=0, ddof=0) > 0]
    if values.shape[1] == 0:
        raise InputError("every region has the same value for all subjects: nothing to cluster")
    if standardise:
        values = pd.DataFrame(StandardScaler().fit_transform(values), index=values.index, columns=values.columns)
    return values


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Canonical labels: cluster 0 is the largest (ties: the one appearing first), so seeds give equal labels."""
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    mapping = {uniq[i]: new for new, i in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=int)


def _model(method: str, k: int, seed: int):
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed)
    if method == "ward":
        return AgglomerativeClustering(n_clusters=k, linkage="ward")
    if method == "gmm":
        return GaussianMixture(n_components=k, covariance_type="diag", n_init=5, reg_covar=1e-3, random_state=seed)
    raise InputError(f"method must be one of {METHODS}, got {method!r}")


def cluster(X: pd.DataFrame | np.ndarray, method: str = "kmeans", k: int = 3, seed: int = 0) -> np.ndarray:
    """Cluster labels 0..k-1 of the rows of ``X`` (0 = largest cluster)."""
    X = np.asarray(X, float)
    if not 2 <= k < len(X):
        raise InputError(f"k={k} needs 2 <= k < number of subjects ({len(X)})")
    distinct = len(np.unique(X, axis=0))
    if distinct < k:
        raise InputError(
            f"k={k} clusters asked for, but the {len(X)} subjects have only {distinct} distinct "
            f"feature rows: there are at most {distinct} clusters to find"
        )
    labels = _relabel(_model(method, k, seed).fit_predict(X))
    if len(np.unique(labels)) < k:
        raise InputError(f"{method} found only {len(np.unique(labels))} of the k={k} clusters asked for")
    return labels


def choose_k(
    X: pd.DataFrame | np.ndarray,
    method: str = "kmeans",
    k_range: Iterable[int] = range(2, 7),
    seed: int = 0,
    criterion: str = "silhouette",
) -> tuple[pd.DataFrame, int]:
    """Silhouette (and BIC for ``gmm``) for each k, and the chosen k (best silhouette, or lowest BIC)."""
    X = np.asarray(X, float)
    ks = [int(k) for k in k_range if 2 <= int(k) < len(X)]
    if not ks:
        raise InputError(f"no k in {list(k_range)} fits {len(X)} subjects (need 2 <= k < n)")
    rows = []
    for k in ks:
        labels = cluster(X, method, k, seed)
        row = {"k": k, "silhouette": silhouette_score(X, labels) if len(set(labels)) > 1 else np.nan}
        if method == "gmm":
            row["bic"] = _model(method, k, seed).fit(X).bic(X)
        rows.append(row)
    table = pd.DataFrame(rows)
    if criterion == "bic":
        if method != "gmm":
            raise InputError("criterion='bic' needs method='gmm'")
        best = int(table.loc[table["bic"].idxmin(), "k"])
    elif criterion == "silhouette":
        best = int(table.loc[table["silhouette"].idxmax(), "k"])
    else:
        raise InputError(f"criterion must be 'silhouette' or 'bic', got {criterion!r}")
    table["chosen"] = table["k"] == best
    return table, best


def stability(
    X: pd.DataFrame | np.ndarray,
    method: str = "kmeans",
    k: int = 3,
    n_boot: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Bootstrap stability: ARI between the full-data clusters and clusters of each resample, on the resampled subjects."""
    X = np.asarray(X, float)
    reference = cluster(X, method, k, seed)
    rng = np.random.default_rng(seed)
    scores = []
    for _ in tqdm(range(n_boot), desc="bootstrap", disable=not progress):
        idx = rng.choice(len(X), len(X), replace=True)
        if len(np.unique(X[idx], axis=0)) <= k:
            continue  # too few distinct subjects in this resample for k clusters
        scores.append(adjusted_rand_score(reference[idx], cluster(X[idx], method, k, seed)))
    return np.array(scores)


def embedding(X: pd.DataFrame | np.ndarray, method: str = "pca", seed: int = 0) -> pd.DataFrame:
    """2D embedding of the subjects (columns dim1, dim2; PCA axes carry their explained variance in ``attrs``)."""
    index = X.index if isinstance(X, pd.DataFrame) else None
    X = np.asarray(X, float)
    if method == "pca":
        model = PCA(n_components=2, random_state=seed)
        coords = model.fit_transform(X)
        attrs = {"explained_variance_ratio": model.explained_variance_ratio_.tolist()}
    elif method == "tsne":
        perplexity = float(min(30.0, max(2.0, (len(X) - 1) / 3)))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)
        attrs = {"perplexity": perplexity}
    else:
        raise InputError(f"embedding method must be 'pca' or 'tsne', got {method!r}")
    out = pd.DataFrame(coords, index=index, columns=["dim1", "dim2"])
    out.attrs.update(attrs, method=method)
    return out


def ari(true: Iterable, pred: Iterable) -> float:
    """Adjusted Rand index between known labels and clusters, over subjects whose known label is present."""
    true, pred = pd.Series(list(true)), pd.Series(list(pred))
    if len(true) != len(pred):
        raise InputError(f"{len(true)} known labels for {len(pred)} cluster labels")
    keep = true.notna() & (true.astype(str) != "")
    return float(adjusted_rand_score(true[keep].astype(str), pred[keep]))


def _categorical_test(table: pd.DataFrame) -> dict:
    table = table.loc[table.sum(axis=1) > 0, table.sum(axis=0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return {"test": "none (one category)", "statistic": np.nan, "p": np.nan}
    if table.shape == (2, 2):
        res = stats.fisher_exact(table.to_numpy())
        return {"test": "Fisher exact", "statistic": float(res.statistic), "p": float(res.pvalue)}
    res = stats.chi2_contingency(table.to_numpy())
    return {"test": "chi-square", "statistic": float(res.statistic), "p": float(res.pvalue), "dof": int(res.dof)}


def association(clusters: pd.Series, participants: pd.DataFrame, id_column: str = "participant_id") -> dict:
    """Clusters against participant data: group and sex contingency tables, age by cluster.

    ``clusters`` is indexed by subject id, matched to ``participants[id_column]``. Returns
    ``{"tests": one row per test, "group": table, "sex": table, "age": summary by cluster}``;
    variables absent or empty in ``participants`` are skipped.
    """
    parts = participants.copy()
    parts[id_column] = parts[id_column].astype(str)
    clusters = pd.Series(clusters, name="cluster")
    clusters.index = clusters.index.astype(str)
    merged = parts.merge(clusters.rename_axis(id_column).reset_index(), on=id_column, how="inner")
    if merged.empty:
        raise InputError(
            f"no subject of the clusters ({list(clusters.index[:3])}...) is in participants[{id_column!r}]"
        )
    out: dict = {}
    tests = []
    for var in ("group", "sex"):
        if var not in merged.columns:
            continue
        known = merged[merged[var].notna() & (merged[var].astype(str) != "")]
        if known.empty:
            continue
        table = pd.crosstab(known[var], known["cluster"])
        out[var] = table
        tests.append({"variable": var, "n": int(len(known)), **_categorical_test(table)})
    if "age" in merged.columns:
        known = merged[pd.to_numeric(merged["age"], errors="coerce").notna()].assign(
            age=lambda d: d["age"].astype(float)
        )
        groups = [g["age"].to_numpy() for _, g in known.groupby("cluster")]
        if len(groups) >= 2 and all(len(g) >= 1 for g in groups):
            out["age"] = known.groupby("cluster")["age"].describe()[["count", "mean", "std", "min", "max"]]
            if all(len(g) >= 2 for g in groups):
                anova = stats.f_oneway(*groups)
                tests.append(
                    {
                        "variable": "age",
                        "n": int(len(known)),
                        "test": "one-way ANOVA",
                        "statistic": float(anova.statistic),
                        "p": float(anova.pvalue),
                    }
                )
            kw = stats.kruskal(*groups)
            tests.append(
                {
                    "variable": "age",
                    "n": int(len(known)),
                    "test": "Kruskal-Wallis",
                    "statistic": float(kw.statistic),
                    "p": float(kw.pvalue),
                }
            )
    out["tests"] = pd.DataFrame(tests, columns=["variable", "n", "test", "statistic", "p", "dof"])
    return out


def profiles(wide: pd.DataFrame, clusters: Iterable) -> pd.DataFrame:
    """Mean value per region of each cluster (clusters x regions), with cluster sizes in ``n``."""
    labels = pd.Series(list(clusters), index=wide.index, name="cluster")
    prof = wide.astype(float).groupby(labels).mean()
    prof.insert(0, "n", labels.value_counts().reindex(prof.index).to_numpy())
    return prof
