"""Generate the example datasets shipped in prefect_torch/examples/data/.

They are synthetic but shaped like real tabular problems, with a known answer:
``housing.csv`` (regression: a price from size, rooms, age, distance, ...) and
``churn.csv`` (binary: whether a customer leaves). Run from the repo root:

    python examples/make_datasets.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "prefect_torch" / "examples" / "data"


def housing(rows: int = 4000, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    area = rng.normal(120, 35, rows).clip(30, 400)
    rooms = np.round(area / 30 + rng.normal(0, 0.8, rows)).clip(1, 10)
    age = rng.uniform(0, 80, rows)
    distance_km = rng.gamma(2.0, 4.0, rows)
    floor = rng.integers(0, 15, rows)
    has_garden = (rng.uniform(size=rows) < 0.35).astype(int)
    energy = rng.normal(0, 1, rows)
    price = (
        2500 * area
        + 8000 * rooms
        - 900 * age
        + 35000 * np.exp(-distance_km / 6)
        + 1500 * np.sqrt(floor)
        + 20000 * has_garden
        - 6000 * energy
        + rng.normal(0, 15000, rows)
    )
    return pd.DataFrame({
        "area_m2": area.round(1), "rooms": rooms.astype(int), "age_years": age.round(1),
        "distance_km": distance_km.round(2), "floor": floor, "has_garden": has_garden,
        "energy_score": energy.round(3), "price": price.round(0),
    })


def churn(rows: int = 3000, seed: int = 11) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, rows)
    monthly = rng.normal(65, 25, rows).clip(10, 150)
    tickets = rng.poisson(1.2, rows)
    contract_years = rng.choice([0, 1, 2], rows, p=[0.55, 0.25, 0.2])
    autopay = (rng.uniform(size=rows) < 0.5).astype(int)
    logit = -1.0 - 0.05 * tenure + 0.03 * monthly + 0.6 * tickets - 1.2 * contract_years - 0.7 * autopay
    churned = rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))
    return pd.DataFrame({
        "tenure_months": tenure, "monthly_charges": monthly.round(2), "support_tickets": tickets,
        "contract_years": contract_years, "autopay": autopay,
        "churned": np.where(churned, "yes", "no"),
    })


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    housing().to_csv(OUT / "housing.csv", index=False)
    churn().to_csv(OUT / "churn.csv", index=False)
    print(f"wrote {OUT}/housing.csv and churn.csv")
