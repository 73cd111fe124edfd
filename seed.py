"""Create the ad-metrics star schema and fill it with deterministic, realistic data.

    python seed.py [--db PATH] [--start YYYY-MM-DD] [--days N] [--density F] [--seed N] [--force]

The database is built in a temporary file beside the target, then put in place: a new
file is linked there; over an existing database (--force) its pages are copied in with
SQLite's backup API, in one transaction under SQLite's locks, so a service reading the
file sees the old data or the new, never a damaged file. An interrupted run leaves the
target as it was.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import sqlite3
import sys
import time
from contextlib import closing
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import quote

SCHEMA = """
CREATE TABLE dim_date (
    date_id INTEGER PRIMARY KEY,
    date_value TEXT NOT NULL UNIQUE CHECK (date(date_value) IS date_value)
) STRICT;
CREATE TABLE dim_region (
    region_id INTEGER PRIMARY KEY,
    region_name TEXT NOT NULL UNIQUE COLLATE NOCASE
) STRICT;
CREATE TABLE dim_age_group (
    age_id INTEGER PRIMARY KEY,
    age_range TEXT NOT NULL UNIQUE COLLATE NOCASE
) STRICT;
CREATE TABLE dim_gender (
    gender_id INTEGER PRIMARY KEY,
    gender_name TEXT NOT NULL UNIQUE COLLATE NOCASE
) STRICT;
CREATE TABLE dim_platform (
    platform_id INTEGER PRIMARY KEY,
    platform_name TEXT NOT NULL UNIQUE COLLATE NOCASE
) STRICT;
CREATE TABLE dim_placement (
    placement_id INTEGER PRIMARY KEY,
    placement_name TEXT NOT NULL UNIQUE COLLATE NOCASE
) STRICT;
CREATE TABLE dim_device_type (
    device_type_id INTEGER PRIMARY KEY,
    device_type_name TEXT NOT NULL UNIQUE COLLATE NOCASE
) STRICT;
-- Clustered on its key, date first: every query reads a date range (all dates by
-- default) of this one B-tree, so no secondary index earns its space.
CREATE TABLE fact_ad_metrics_daily (
    date_id INTEGER NOT NULL REFERENCES dim_date,
    region_id INTEGER NOT NULL REFERENCES dim_region,
    age_id INTEGER NOT NULL REFERENCES dim_age_group,
    gender_id INTEGER NOT NULL REFERENCES dim_gender,
    platform_id INTEGER NOT NULL REFERENCES dim_platform,
    placement_id INTEGER NOT NULL REFERENCES dim_placement,
    device_type_id INTEGER NOT NULL REFERENCES dim_device_type,
    impressions INTEGER NOT NULL CHECK (impressions >= 0),
    clicks INTEGER NOT NULL CHECK (clicks BETWEEN 0 AND impressions),
    cost REAL NOT NULL CHECK (cost >= 0),
    conversions INTEGER NOT NULL CHECK (conversions >= 0),
    likes INTEGER NOT NULL CHECK (likes >= 0),
    PRIMARY KEY (date_id, region_id, age_id, gender_id, platform_id, placement_id,
                 device_type_id)
) STRICT, WITHOUT ROWID;
"""

# Region: (name, CPM in USD, audience weight). Names in alphabetical order.
REGIONS = [
    ("Africa", 1.6, 0.7),
    ("East Asia", 7.0, 0.8),
    ("Eastern Europe", 2.6, 0.6),
    ("Latin America", 2.2, 1.2),
    ("Middle East", 4.5, 0.5),
    ("North America", 11.5, 1.6),
    ("Oceania", 9.0, 0.3),
    ("South Asia", 1.1, 1.5),
    ("Southeast Asia", 1.5, 1.3),
    ("Western Europe", 7.8, 1.2),
]
# Age bracket: (name, audience weight, CTR factor, conversion factor), ascending.
AGE_GROUPS = [
    ("18-24", 0.9, 1.15, 0.7),
    ("25-34", 1.4, 1.1, 1.0),
    ("35-44", 1.2, 1.0, 1.15),
    ("45-54", 0.9, 0.9, 1.2),
    ("55-64", 0.6, 0.85, 1.1),
    ("65+", 0.4, 0.8, 0.9),
]
GENDERS = [("Female", 1.0), ("Male", 0.95), ("Unknown", 0.05)]
# Platform: (name, audience weight, CPM factor).
PLATFORMS = [
    ("Facebook", 1.0, 1.0),
    ("Instagram", 0.8, 1.2),
    ("Audience Network", 0.35, 0.45),
    ("Messenger", 0.15, 0.7),
]
PLACEMENTS = [
    "Feed",
    "Stories",
    "Reels",
    "Explore",
    "Marketplace",
    "Video Feeds",
    "Search Results",
    "Right Column",
    "In-Stream Video",
    "Inbox",
    "Native, Banner & Interstitial",
    "Rewarded Video",
]
# Where each platform shows ads: placement -> (share of the platform's audience, CTR).
PLATFORM_PLACEMENTS = {
    "Facebook": {
        "Feed": (1.0, 0.012),
        "Stories": (0.35, 0.008),
        "Reels": (0.4, 0.009),
        "Marketplace": (0.2, 0.010),
        "Video Feeds": (0.25, 0.006),
        "Search Results": (0.05, 0.018),
        "Right Column": (0.1, 0.004),
        "In-Stream Video": (0.2, 0.005),
    },
    "Instagram": {
        "Feed": (0.9, 0.010),
        "Stories": (0.7, 0.007),
        "Reels": (0.6, 0.008),
        "Explore": (0.2, 0.006),
        "Search Results": (0.05, 0.015),
    },
    "Audience Network": {
        "Native, Banner & Interstitial": (0.7, 0.009),
        "Rewarded Video": (0.3, 0.020),
    },
    "Messenger": {"Inbox": (0.6, 0.007), "Stories": (0.4, 0.005)},
}
# Device: (name, audience weight, CPM factor, CTR factor, conversion factor).
DEVICE_TYPES = [
    ("Desktop", 0.25, 1.4, 0.9, 1.4),
    ("Mobile", 0.68, 1.0, 1.0, 0.9),
    ("Tablet", 0.07, 0.9, 1.1, 1.0),
]
MOBILE_ONLY = {
    "Stories",
    "Reels",
    "Explore",
    "Native, Banner & Interstitial",
    "Rewarded Video",
}
DESKTOP_ONLY = {"Right Column"}
WEEKDAY_VOLUME = (1.0, 1.02, 1.03, 1.01, 0.97, 0.88, 0.9)  # Monday first
MONTH_CPM = (0.82, 0.88, 0.95, 0.97, 1.0, 1.0, 0.97, 0.98, 1.03, 1.08, 1.3, 1.38)
DAILY_GROWTH = 0.0008  # about +34% a year
BASE_IMPRESSIONS = 6000  # a day, for a segment of weight 1

DEFAULT_START = date(2025, 1, 1)
DEFAULT_DAYS = 365
DEFAULT_DENSITY = 0.12


def segments() -> list[tuple]:
    """List every valid segment: its six dimension ids and its fixed rates."""
    placement_ids = {name: i for i, name in enumerate(PLACEMENTS, 1)}
    result = []
    for region_id, (_, cpm, region_w) in enumerate(REGIONS, 1):
        for age_id, (_, age_w, age_ctr, age_cvr) in enumerate(AGE_GROUPS, 1):
            for gender_id, (_, gender_w) in enumerate(GENDERS, 1):
                for platform_id, (platform, platform_w, platform_cpm) in enumerate(
                    PLATFORMS, 1
                ):
                    for placement, (share, ctr) in PLATFORM_PLACEMENTS[
                        platform
                    ].items():
                        for device_id, device in enumerate(DEVICE_TYPES, 1):
                            name, device_w, device_cpm, device_ctr, device_cvr = device
                            if (placement in MOBILE_ONLY and name == "Desktop") or (
                                placement in DESKTOP_ONLY and name != "Desktop"
                            ):
                                continue
                            weight = region_w * age_w * gender_w * platform_w * share
                            result.append(
                                (
                                    (region_id, age_id, gender_id, platform_id),
                                    placement_ids[placement],
                                    device_id,
                                    BASE_IMPRESSIONS * weight * device_w,
                                    ctr * age_ctr * device_ctr,
                                    0.045 * age_cvr * device_cvr,
                                    cpm * platform_cpm * device_cpm,
                                )
                            )
    result.sort(key=lambda s: (*s[0], s[1], s[2]))  # key order: inserts append
    return result


def fact_rows(start: date, days: int, density: float, rng: random.Random):
    """Yield fact rows in primary-key order."""
    segs = segments()
    # Bigger segments deliver on more days: presence grows with the square root of
    # the segment's size, scaled so that `density` is the mean presence.
    root = [math.sqrt(s[3]) for s in segs]
    scale = density * len(segs) / sum(root)
    presence = [min(1.0, scale * r) for r in root]
    rand = rng.random
    for date_id in range(1, days + 1):
        day = start + timedelta(days=date_id - 1)
        volume = WEEKDAY_VOLUME[day.weekday()] * (1 + DAILY_GROWTH) ** (date_id - 1)
        volume *= 0.9 + 0.2 * rand()  # the day's own luck
        cpm_day = MONTH_CPM[day.month - 1] * (0.95 + 0.1 * rand())
        for (ids, placement_id, device_id, imps, ctr, cvr, cpm), p in zip(
            segs, presence
        ):
            if rand() >= p:
                continue
            impressions = int(imps * volume * (0.4 + 1.2 * rand()))
            clicks = min(
                impressions, int(impressions * ctr * (0.6 + 0.8 * rand()) + rand())
            )
            conversions = int(clicks * cvr * (0.5 + rand()) + rand())
            likes = int(impressions * 0.004 * (0.5 + rand()) + rand())
            cost = round(impressions * cpm * cpm_day * (0.85 + 0.3 * rand()) / 1000, 2)
            yield (date_id, *ids, placement_id, device_id, impressions, clicks, cost,
                   conversions, likes)  # fmt: skip


def seed(
    path: str | os.PathLike,
    *,
    start: date = DEFAULT_START,
    days: int = DEFAULT_DAYS,
    density: float = DEFAULT_DENSITY,
    seed: int = 0,
    force: bool = False,
) -> int:
    """Build the database at `path` and return the number of fact rows.

    Raises FileExistsError if `path` exists and `force` is false, ValueError for
    arguments out of range.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], not {density}")
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to replace it")
    live = database_format(target) if target.exists() else None
    # A fresh name beside the target (so the rename stays on one file system), created
    # with the usual permissions rather than mkstemp's owner-only ones.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        page_size, journal_mode = live or (8192, "wal")
        rows = build(tmp, page_size, journal_mode, start, days, density, seed)
        if live:
            copy_into(tmp, target)
        else:
            place(tmp, target, replace=force)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def build(
    path: Path,
    page_size: int,
    journal_mode: str,
    start: date,
    days: int,
    density: float,
    seed: int,
) -> int:
    """Create the schema in the new file at `path` and fill it; return the fact rows."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # The file is private until it is in place: no journal, no syncs while building.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(f"PRAGMA page_size = {int(page_size)}")
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO dim_date VALUES (?, ?)",
            (
                (i, (start + timedelta(days=i - 1)).isoformat())
                for i in range(1, days + 1)
            ),
        )
        for table, names in [
            ("dim_region", [r[0] for r in REGIONS]),
            ("dim_age_group", [a[0] for a in AGE_GROUPS]),
            ("dim_gender", [g[0] for g in GENDERS]),
            ("dim_platform", [p[0] for p in PLATFORMS]),
            ("dim_placement", PLACEMENTS),
            ("dim_device_type", [d[0] for d in DEVICE_TYPES]),
        ]:
            db.executemany(f"INSERT INTO {table} VALUES (?, ?)", enumerate(names, 1))
        db.executemany(
            "INSERT INTO fact_ad_metrics_daily VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            fact_rows(start, days, density, random.Random(seed)),
        )
        [[rows]] = db.execute("SELECT count(*) FROM fact_ad_metrics_daily")
        db.execute("COMMIT")
        db.execute("ANALYZE")
        # WAL lets readers and the heartbeat's writer work side by side. The mode is
        # written in the file's header, which a copy into a live file carries along.
        db.execute(
            f"PRAGMA journal_mode = {'WAL' if journal_mode == 'wal' else 'DELETE'}"
        )
    finally:
        db.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return rows


def database_format(path: Path) -> tuple[int, str] | None:
    """The page size and journal mode of the SQLite database at path; None if it is
    not one that can be read."""
    try:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            [[page_size]] = db.execute("PRAGMA page_size")
            [[journal_mode]] = db.execute("PRAGMA journal_mode")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        return None
    return page_size, journal_mode


def copy_into(source: Path, target: Path) -> None:
    """Write the new database into the live file at target with SQLite's backup API:
    one transaction under SQLite's own locks, so that readers of the file see the old
    data or the new, never a mix, and an interrupted copy leaves the old data whole.
    (Renaming a new file over a live one would pair it with the old file's -wal.)"""
    with (
        closing(sqlite3.connect(source)) as src,
        closing(sqlite3.connect(target, timeout=60)) as dst,
    ):
        src.backup(dst)


def place(tmp: Path, target: Path, replace: bool) -> None:
    """Put the finished file at target: a rename over a file that is not a readable
    database (with --force), else a link that fails if the target appeared."""
    for suffix in ("-wal", "-shm", "-journal"):  # a removed database's, never ours
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    if replace:
        os.replace(tmp, target)
    else:
        os.link(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        description="Create and fill an ad-metrics database."
    )
    parser.add_argument("--db", default=os.environ.get("ADS_DB", "ads.db"),
                        help="database path (default: $ADS_DB or ads.db)")  # fmt: skip
    parser.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START,
                        help="first date, YYYY-MM-DD (default: %(default)s)")  # fmt: skip
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS,
                        help="number of days (default: %(default)s)")  # fmt: skip
    parser.add_argument("--density", type=float, default=DEFAULT_DENSITY,
                        help="mean share of the 7,380 daily segments that have a row, "
                        "in (0, 1] (default: %(default)s; 0.45 gives about 1.1M rows a year)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives the same rows (default: 0)")  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="replace an existing database"
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        rows = seed(args.db, start=args.start, days=args.days, density=args.density,
                    seed=args.seed, force=args.force)  # fmt: skip
    except (FileExistsError, ValueError) as e:
        print(f"seed.py: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - began
    print(
        f"seeded {rows:,} rows over {args.days} days in {seconds:.2f} s into {args.db}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
