"""Create the ad-metrics star schema and fill it with deterministic, realistic data.

  python seed.py [--db PATH] [--start DAY] [--days N] [--density F] [--seed N] [--force]

The database is written to a new file beside the target and then renamed over it, so
a service reading the target sees the old file or the new one, never half of one.
"""

import argparse
import math
import os
import random
import sqlite3
import sys
from datetime import date, timedelta
from itertools import product
from pathlib import Path

SCHEMA = """
CREATE TABLE dim_date (date_id INTEGER PRIMARY KEY, date_value TEXT NOT NULL UNIQUE);
CREATE TABLE dim_region (region_id INTEGER PRIMARY KEY, region_name TEXT NOT NULL);
CREATE TABLE dim_age_group (age_id INTEGER PRIMARY KEY, age_range TEXT NOT NULL);
CREATE TABLE dim_gender (gender_id INTEGER PRIMARY KEY, gender_name TEXT NOT NULL);
CREATE TABLE dim_platform (platform_id INTEGER PRIMARY KEY, platform_name TEXT NOT NULL);
CREATE TABLE dim_placement (placement_id INTEGER PRIMARY KEY, placement_name TEXT NOT NULL);
CREATE TABLE dim_device_type (device_type_id INTEGER PRIMARY KEY, device_type_name TEXT NOT NULL);
-- Clustered on its key, date first: a query reads a range of dates of this one tree.
CREATE TABLE fact_ad_metrics_daily (
    date_id INTEGER NOT NULL REFERENCES dim_date,
    region_id INTEGER NOT NULL REFERENCES dim_region,
    age_id INTEGER NOT NULL REFERENCES dim_age_group,
    gender_id INTEGER NOT NULL REFERENCES dim_gender,
    platform_id INTEGER NOT NULL REFERENCES dim_platform,
    placement_id INTEGER NOT NULL REFERENCES dim_placement,
    device_type_id INTEGER NOT NULL REFERENCES dim_device_type,
    impressions INTEGER NOT NULL, clicks INTEGER NOT NULL, cost REAL NOT NULL,
    conversions INTEGER NOT NULL, likes INTEGER NOT NULL,
    PRIMARY KEY (date_id, region_id, age_id, gender_id, platform_id, placement_id,
                 device_type_id)
) WITHOUT ROWID;
"""

# Region: name, CPM in USD, audience weight.
REGIONS = [
    ("Africa", 1.6, 0.7), ("East Asia", 7.0, 0.8), ("Eastern Europe", 2.6, 0.6),
    ("Latin America", 2.2, 1.2), ("Middle East", 4.5, 0.5),
    ("North America", 11.5, 1.6), ("Oceania", 9.0, 0.3), ("South Asia", 1.1, 1.5),
    ("Southeast Asia", 1.5, 1.3), ("Western Europe", 7.8, 1.2),
]  # fmt: skip
# Age bracket: name, audience weight, CTR factor, conversion factor.
AGE_GROUPS = [
    ("18-24", 0.9, 1.15, 0.7), ("25-34", 1.4, 1.1, 1.0), ("35-44", 1.2, 1.0, 1.15),
    ("45-54", 0.9, 0.9, 1.2), ("55-64", 0.6, 0.85, 1.1), ("65+", 0.4, 0.8, 0.9),
]  # fmt: skip
GENDERS = [("Female", 1.0), ("Male", 0.95), ("Unknown", 0.05)]
# Platform: name, audience weight, CPM factor.
PLATFORMS = [
    ("Facebook", 1.0, 1.0), ("Instagram", 0.8, 1.2),
    ("Audience Network", 0.35, 0.45), ("Messenger", 0.15, 0.7),
]  # fmt: skip
PLACEMENTS = [
    "Feed", "Stories", "Reels", "Explore", "Marketplace", "Video Feeds",
    "Search Results", "Right Column", "In-Stream Video", "Inbox",
    "Native, Banner & Interstitial", "Rewarded Video",
]  # fmt: skip
# Where each platform shows ads: placement -> (share of its audience, CTR).
PLATFORM_PLACEMENTS = {
    "Facebook": {
        "Feed": (1.0, 0.012), "Stories": (0.35, 0.008), "Reels": (0.4, 0.009),
        "Marketplace": (0.2, 0.010), "Video Feeds": (0.25, 0.006),
        "Search Results": (0.05, 0.018), "Right Column": (0.1, 0.004),
        "In-Stream Video": (0.2, 0.005),
    },
    "Instagram": {
        "Feed": (0.9, 0.010), "Stories": (0.7, 0.007), "Reels": (0.6, 0.008),
        "Explore": (0.2, 0.006), "Search Results": (0.05, 0.015),
    },
    "Audience Network": {
        "Native, Banner & Interstitial": (0.7, 0.009), "Rewarded Video": (0.3, 0.020),
    },
    "Messenger": {"Inbox": (0.6, 0.007), "Stories": (0.4, 0.005)},
}  # fmt: skip
# Device: name, audience weight, CPM factor, CTR factor, conversion factor.
DEVICE_TYPES = [
    ("Desktop", 0.25, 1.4, 0.9, 1.4), ("Mobile", 0.68, 1.0, 1.0, 0.9),
    ("Tablet", 0.07, 0.9, 1.1, 1.0),
]  # fmt: skip
MOBILE_ONLY = {"Stories", "Reels", "Explore", "Native, Banner & Interstitial",
               "Rewarded Video"}  # fmt: skip
DESKTOP_ONLY = {"Right Column"}
WEEKDAY_VOLUME = (1.0, 1.02, 1.03, 1.01, 0.97, 0.88, 0.9)  # Monday first
MONTH_CPM = (0.82, 0.88, 0.95, 0.97, 1.0, 1.0, 0.97, 0.98, 1.03, 1.08, 1.3, 1.38)
DAILY_GROWTH = 0.0008  # about a third more in a year
BASE_IMPRESSIONS = 6000  # a day, for a segment of weight 1
FACT = ", ".join("?" * 12)  # a fact row's twelve columns


def segments() -> list[tuple]:
    """Every segment that shows ads, in the key's order: its ids and its daily rates."""
    placement_ids = {name: i for i, name in enumerate(PLACEMENTS, 1)}
    dims = [REGIONS, AGE_GROUPS, GENDERS, PLATFORMS, DEVICE_TYPES]
    result = []
    for rows in product(*(list(enumerate(dim, 1)) for dim in dims)):
        (r, region), (a, age), (g, gender), (p, platform), (d, device) = rows
        for placement, (share, ctr) in PLATFORM_PLACEMENTS[platform[0]].items():
            if placement in (MOBILE_ONLY if device[0] == "Desktop" else DESKTOP_ONLY):
                continue
            weight = region[2] * age[1] * gender[1] * platform[1] * share * device[1]
            impressions, cvr = BASE_IMPRESSIONS * weight, 0.045 * age[3] * device[4]
            ctr, cpm = ctr * age[2] * device[3], region[1] * platform[2] * device[2]
            ids = (r, a, g, p, placement_ids[placement], d)
            result.append((ids, impressions, ctr, cvr, cpm))
    return sorted(result)


def fact_rows(start: date, days: int, density: float, rng: random.Random):
    """Yield the fact rows in the key's order."""
    segs = segments()
    # A bigger segment delivers on more days: its presence grows with the square root
    # of its size, scaled so that the mean presence is `density`.
    root = [math.sqrt(segment[1]) for segment in segs]
    scale = density * len(segs) / sum(root)
    presence = [min(1.0, scale * r) for r in root]
    rand = rng.random
    for date_id in range(1, days + 1):
        day = start + timedelta(days=date_id - 1)
        volume = WEEKDAY_VOLUME[day.weekday()] * (1 + DAILY_GROWTH) ** (date_id - 1)
        volume *= 0.9 + 0.2 * rand()  # the day's own luck
        cpm_day = MONTH_CPM[day.month - 1] * (0.95 + 0.1 * rand())
        for (ids, imps, ctr, cvr, cpm), p in zip(segs, presence):
            if rand() >= p:
                continue
            impressions = int(imps * volume * (0.4 + 1.2 * rand()))
            clicks = int(impressions * ctr * (0.6 + 0.8 * rand()) + rand())
            clicks = min(impressions, clicks)
            conversions = int(clicks * cvr * (0.5 + rand()) + rand())
            likes = int(impressions * 0.004 * (0.5 + rand()) + rand())
            cost = round(impressions * cpm * cpm_day * (0.85 + 0.3 * rand()) / 1000, 2)
            metrics = (impressions, clicks, cost, conversions, likes)
            yield (date_id, *ids, *metrics)


def seed(path, *, start=date(2025, 1, 1), days=365, density=0.12, seed=0, force=False):
    """Build the database at `path` and return its number of fact rows."""
    if days < 1 or not 0 < density <= 1:
        raise ValueError("days must be at least 1, and density in (0, 1]")
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to replace it")
    new = target.with_name(f".{target.name}.{os.getpid()}.new")  # beside the target
    names = {
        "dim_date": [str(start + timedelta(days=i)) for i in range(days)],
        "dim_region": [region[0] for region in REGIONS],
        "dim_age_group": [age_group[0] for age_group in AGE_GROUPS],
        "dim_gender": [gender[0] for gender in GENDERS],
        "dim_platform": [platform[0] for platform in PLATFORMS],
        "dim_placement": PLACEMENTS,
        "dim_device_type": [device_type[0] for device_type in DEVICE_TYPES],
    }
    try:
        with sqlite3.connect(new) as db:
            db.executescript(SCHEMA)
            for table, rows in names.items():
                db.executemany(f"INSERT INTO {table} VALUES (?, ?)", enumerate(rows, 1))
            facts = fact_rows(start, days, density, random.Random(seed))
            db.executemany(f"INSERT INTO fact_ad_metrics_daily VALUES ({FACT})", facts)
            [[count]] = db.execute("SELECT count(*) FROM fact_ad_metrics_daily")
        db.close()
        os.replace(new, target)  # the old file, or the new one: never half of one
    finally:
        new.unlink(missing_ok=True)
    return count


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(description="Create an ad-metrics database.")
    default_db = os.environ.get("ADS_DB", "ads.db")
    parser.add_argument("--db", default=default_db, help="default: $ADS_DB or ads.db")
    first_day = date(2025, 1, 1)
    parser.add_argument("--start", type=date.fromisoformat, default=first_day)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--density", type=float, default=0.12, help="in (0, 1]")
    parser.add_argument(
        "--seed", type=int, default=0, help="the same seed, the same rows"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        options = {"start": args.start, "days": args.days, "seed": args.seed}
        count = seed(args.db, **options, density=args.density, force=args.force)
    except (FileExistsError, ValueError) as e:
        print(f"seed.py: {e}", file=sys.stderr)
        return 2
    print(f"seeded {count:,} rows over {args.days} days into {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
