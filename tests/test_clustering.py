"""Clustering of subjects by lesion pattern: planted groups, k selection, stability, association tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from wmloc_utils import clustering as cl
from wmloc_utils import figures
from wmloc_utils.errors import InputError


def planted(n_per: int = 10, n_regions: int = 12, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Three groups of subjects whose lesions sit in different regions (loads in mL, log-normal noise)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for g in range(3):
        for _ in range(n_per):
            load = rng.lognormal(-3, 0.5, n_regions)
            load[4 * g : 4 * g + 4] += rng.lognormal(0.5, 0.3, 4)
            rows.append(load)
            truth.append(g)
    wide = pd.DataFrame(
        rows, index=[f"s{i:02d}" for i in range(len(rows))], columns=[f"r{j}" for j in range(n_regions)]
    )
    return wide, np.array(truth)


@pytest.mark.parametrize("method", cl.METHODS)
def test_recovers_planted_groups(method):
    wide, truth = planted()
    X = cl.features(wide, "log")
    labels = cl.cluster(X, method, 3, seed=0)
    assert cl.ari(truth, labels) > 0.9


def test_choose_k_and_stability_on_planted_groups():
    wide, _ = planted()
    X = cl.features(wide, "proportion")
    table, k = cl.choose_k(X, "gmm", range(2, 6), seed=0)
    assert k == 3
    assert list(table["k"]) == [2, 3, 4, 5] and table["bic"].notna().all() and table["chosen"].sum() == 1
    assert table.loc[table["k"] == 3, "silhouette"].item() == pytest.approx(table["silhouette"].max())
    boot = cl.stability(X, "kmeans", 3, n_boot=10, seed=1)
    assert len(boot) == 10 and boot.mean() > 0.9
    np.testing.assert_array_equal(boot, cl.stability(X, "kmeans", 3, n_boot=10, seed=1))


def test_transforms():
    wide = pd.DataFrame({"a": [1.0, 0.0, 3.0], "b": [3.0, 0.0, 1.0], "const": [2.0, 2.0, 2.0]}, index=["x", "y", "z"])
    prop = cl.features(wide, "proportion", standardise=False)
    assert list(prop.columns) == ["a", "b", "const"]  # constant before the transform, not after
    np.testing.assert_allclose(prop.loc["x"], [1 / 6, 3 / 6, 2 / 6])
    np.testing.assert_allclose(prop.loc["y"], [0, 0, 1.0])
    logged = cl.features(wide, "log", standardise=False)
    assert list(logged.columns) == ["a", "b"]  # the constant column carries nothing
    np.testing.assert_allclose(logged["a"], np.log1p([1.0, 0.0, 3.0]))
    z = cl.features(wide, "raw")
    np.testing.assert_allclose(z.mean(), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(ddof=0), 1)
    with pytest.raises(InputError, match="transform must be one of"):
        cl.features(wide, "sqrt")
    with pytest.raises(InputError, match="negative"):
        cl.features(-wide, "raw")


def test_determinism_and_canonical_labels():
    wide, truth = planted(seed=3)
    X = cl.features(wide)
    a, b = cl.cluster(X, "gmm", 3, seed=5), cl.cluster(X, "gmm", 3, seed=5)
    np.testing.assert_array_equal(a, b)
    sizes = np.bincount(cl.cluster(X.iloc[:25], "kmeans", 3, seed=0))
    assert list(sizes) == sorted(sizes, reverse=True)  # cluster 0 is the largest
    e1, e2 = cl.embedding(X, "tsne", seed=2), cl.embedding(X, "tsne", seed=2)
    pd.testing.assert_frame_equal(e1, e2)
    pca = cl.embedding(X, "pca")
    assert list(pca.index) == list(X.index) and pca.attrs["explained_variance_ratio"][0] > 0.3
    with pytest.raises(InputError, match="k=30 needs"):
        cl.cluster(X, "kmeans", 30)


def test_ari_skips_unknown_labels():
    assert cl.ari(["a", "a", "b", "b"], [1, 1, 0, 0]) == 1.0
    assert cl.ari(["a", "a", "b", "b", None, ""], [1, 1, 0, 0, 0, 1]) == 1.0
    assert cl.ari(["a", "b", "a", "b"], [0, 0, 1, 1]) == pytest.approx(-0.5)


def test_association_matches_scipy():
    clusters = pd.Series([0] * 6 + [1] * 6 + [2] * 6, index=[f"p{i}" for i in range(18)])
    groups = ["A"] * 5 + ["B"] + ["A"] * 2 + ["B"] * 4 + ["C"] * 5 + ["A"]
    ages = np.arange(18) * 2.0 + 40
    sex = ["F", "M"] * 9
    parts = pd.DataFrame(
        {
            "participant_id": [f"p{i}" for i in range(18)] + ["extra"],
            "group": groups + ["A"],
            "age": list(ages) + [99],
            "sex": sex + ["F"],
        }
    )
    out = cl.association(clusters, parts)
    table = pd.crosstab(pd.Series(groups, name="group"), pd.Series(clusters.to_numpy(), name="cluster"))
    pd.testing.assert_frame_equal(out["group"], table, check_names=False)
    tests = out["tests"].set_index(["variable", "test"])
    expect = stats.chi2_contingency(table.to_numpy())
    assert tests.loc[("group", "chi-square"), "p"] == pytest.approx(expect.pvalue)
    assert tests.loc[("group", "chi-square"), "statistic"] == pytest.approx(expect.statistic)
    splits = [ages[:6], ages[6:12], ages[12:]]
    assert tests.loc[("age", "one-way ANOVA"), "p"] == pytest.approx(stats.f_oneway(*splits).pvalue)
    assert tests.loc[("age", "Kruskal-Wallis"), "statistic"] == pytest.approx(stats.kruskal(*splits).statistic)
    assert out["age"].loc[1, "mean"] == pytest.approx(ages[6:12].mean())
    assert tests.loc[("sex", "chi-square"), "n"] == 18


def test_association_two_by_two_uses_fisher():
    clusters = pd.Series([0, 0, 0, 0, 1, 1, 1, 1], index=list("abcdefgh"))
    parts = pd.DataFrame({"participant_id": list("abcdefgh"), "group": list("XXXYYYYX"), "sex": [""] * 8})
    out = cl.association(clusters, parts)
    tests = out["tests"].set_index("variable")
    assert tests.loc["group", "test"] == "Fisher exact"
    assert tests.loc["group", "p"] == pytest.approx(stats.fisher_exact([[3, 1], [1, 3]]).pvalue)
    assert "sex" not in out  # all empty: skipped


def test_figures_and_profiles():
    wide, truth = planted()
    X = cl.features(wide)
    labels = cl.cluster(X, "kmeans", 3)
    prof = cl.profiles(wide, labels)
    assert prof["n"].sum() == len(wide)
    assert prof.loc[labels[0], "r0"] == pytest.approx(wide["r0"][labels == labels[0]].mean())
    heat = figures.profile_heatmap(prof)
    assert heat.data[0].z.shape == (3, 12)
    table, k = cl.choose_k(X, "kmeans", range(2, 5))
    assert len(figures.k_curve(table).data) == 1
    fig = figures.embedding_figure(cl.embedding(X), labels)
    assert sum(len(t.x) for t in fig.data) == len(wide)


def test_infinite_loads_and_identical_subjects_are_errors_not_fewer_columns_or_clusters():
    import numpy as np
    import pandas as pd

    from wmloc_utils import clustering
    from wmloc_utils.errors import InputError

    wide = pd.DataFrame({"A": [1.0, 2.0, 3.0], "B": [0.5, np.inf, 1.0]}, index=["s1", "s2", "s3"])
    with pytest.raises(InputError, match=r"infinite values \(subject 's2', region 'B'"):
        clustering.features(wide, "raw")
    same = np.ones((4, 3))
    with pytest.raises(InputError, match="only 1 distinct feature rows"):
        clustering.cluster(same, "kmeans", 2)
