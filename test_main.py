"""Tests for the Ad Metrics API.

Every /metrics answer is compared with `reference()`, an independent reading of the API
contract in plain Python over the rows the fixture database was built from.
"""

import asyncio
import logging
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from itertools import pairwise, product
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

warnings.filterwarnings("ignore", message=".*httpx2.*")  # Starlette's TestClient notice
from fastapi.testclient import TestClient

import main
import seed

HERE = Path(__file__).parent

# The fixture's dimensions. Ids are sparse and not in name order; Quebec has no rows.
DIMS = {
    "region": ("dim_region", "region_id", "region_name", {7: "Mike", 2: "Zulu", 5: "Alpha", 9: "Quebec"}),
    "age_group": ("dim_age_group", "age_id", "age_range", {4: "18-24", 1: "35-44"}),
    "gender": ("dim_gender", "gender_id", "gender_name", {2: "female", 1: "Male"}),
    "platform": ("dim_platform", "platform_id", "platform_name", {9: "Facebook", 3: "Instagram"}),
    "placement": ("dim_placement", "placement_id", "placement_name", {1: "Stories", 2: "Feed", 6: "Reels"}),
    "device_type": ("dim_device_type", "device_type_id", "device_type_name", {8: "Mobile", 6: "Tablet"}),
}  # fmt: skip
DAYS = [(date(2025, 1, 27) + timedelta(days=i)).isoformat() for i in range(20)]
DATE_IDS = dict(
    zip(DAYS, random.Random(1).sample(range(100, 200), len(DAYS)))
)  # not in date order
BASE = ["impressions", "clicks", "cost", "conversions", "likes"]
METRICS = [*BASE, "ctr", "cpc", "cpm", "cpa", "conversion_rate"]
GRAIN = ["date", *DIMS]


def make_facts() -> list[dict]:
    """Generate the fixture's rows: names, dates and metrics, cost in whole cents."""
    rng = random.Random(42)
    ids = {
        dim: [i for i, name in DIMS[dim][3].items() if name != "Quebec"] for dim in DIMS
    }
    facts = []
    for day, combo in product(DAYS, product(*ids.values())):
        if rng.random() > 0.3:
            continue
        imps = rng.choice([0, rng.randint(1, 40), rng.randint(100, 20000)])
        row = dict(zip(DIMS, combo), date=day)
        if (
            day == "2025-02-03" and row["region"] == 7
        ):  # a group with no impressions at all
            imps = 0
        clicks = rng.randint(0, imps // 15) if imps else 0
        conversions = rng.randint(0, clicks // 4) if clicks else 0
        row |= {"impressions": imps, "clicks": clicks, "conversions": conversions,
                "likes": rng.randint(0, imps // 50), "cost": rng.randint(1, 2 * imps) if imps else 0}  # fmt: skip
        facts.append(row)
    return facts


FACTS = make_facts()


def build_db(path: Path, unique_key: bool = True) -> Path:
    """Write the fixture database: plain tables, as someone else's file might have."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE dim_date (date_id INTEGER PRIMARY KEY, date_value TEXT)")
    db.executemany(
        "INSERT INTO dim_date VALUES (?, ?)", [(i, d) for d, i in DATE_IDS.items()]
    )
    for table, id_col, name_col, names in DIMS.values():
        db.execute(
            f"CREATE TABLE {table} ({id_col} INTEGER PRIMARY KEY, {name_col} TEXT)"
        )
        db.executemany(f"INSERT INTO {table} VALUES (?, ?)", names.items())
    ids = ", ".join(d[1] for d in DIMS.values())
    key = f", PRIMARY KEY (date_id, {ids})" if unique_key else ""
    db.execute(
        f"CREATE TABLE fact_ad_metrics_daily (date_id INTEGER, {ids}, impressions INTEGER, "
        f"clicks INTEGER, cost REAL, conversions INTEGER, likes INTEGER{key})"
    )
    db.executemany(
        "INSERT INTO fact_ad_metrics_daily VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [(DATE_IDS[f["date"]], *(f[d] for d in DIMS), f["impressions"], f["clicks"],
          f["cost"] / 100, f["conversions"], f["likes"]) for f in FACTS],
    )  # fmt: skip
    db.commit()
    db.close()
    return path


def values(params: dict, name: str) -> list[str]:
    raw = params.get(name, [])
    return [
        v.strip()
        for item in ([raw] if isinstance(raw, str) else raw)
        for v in item.split(",")
    ]


def label(fact: dict, field: str) -> str:
    if field in DIMS:
        return DIMS[field][3][fact[field]]
    day = date.fromisoformat(fact["date"])
    return {"date": fact["date"], "week": (day - timedelta(days=day.weekday())).isoformat(),
            "month": fact["date"][:7]}[field]  # fmt: skip


def order_value(field: str, value):
    """The number a field sorts by: dimensions by id, periods by time, metrics as is."""
    if field in DIMS:
        return {name: i for i, name in DIMS[field][3].items()}[value]
    if field in ("date", "week"):
        return date.fromisoformat(value).toordinal()
    return int(value.replace("-", "")) if field == "month" else value


def half_up(numerator, denominator) -> float | None:
    """Round numerator/denominator half-up to 6 decimals, exactly; None for 0/0."""
    if denominator == 0:
        return None
    return float(
        Fraction(
            math.floor(Fraction(numerator) / denominator * 10**6 + Fraction(1, 2)),
            10**6,
        )
    )


def metrics(s: dict) -> dict:
    cost = Fraction(s["cost"], 100)
    return {"impressions": s["impressions"], "clicks": s["clicks"], "cost": float(cost),
            "conversions": s["conversions"], "likes": s["likes"],
            "ctr": half_up(s["clicks"], s["impressions"]), "cpc": half_up(cost, s["clicks"]),
            "cpm": half_up(1000 * cost, s["impressions"]), "cpa": half_up(cost, s["conversions"]),
            "conversion_rate": half_up(s["conversions"], s["clicks"])}  # fmt: skip


def reference(params: dict) -> tuple[list[dict], dict]:
    """Answer a /metrics query as the contract says: all groups, in order, and totals."""
    rows = [
        f for f in FACTS
        if params.get("start_date", "0") <= f["date"] <= params.get("end_date", "9")
        and all(label(f, dim).casefold() in {v.casefold() for v in values(params, dim)}
                for dim in DIMS if values(params, dim))
    ]  # fmt: skip
    fields = values(params, "group_by") or GRAIN
    sums: dict[tuple, dict] = {}
    for f in rows:
        s = sums.setdefault(
            tuple(label(f, field) for field in fields), dict.fromkeys(BASE, 0)
        )
        for m in BASE:
            s[m] += f[m]
    groups = [dict(zip(fields, key)) | metrics(s) for key, s in sums.items()]
    sort = values(params, "sort")
    order = sort + [f for f in fields if f not in {s.lstrip("-") for s in sort}]

    def key(row):
        parts = []
        for item in order:
            v = row[item.lstrip("-")]
            v = None if v is None else order_value(item.lstrip("-"), v)
            parts.append(
                (v is None, 0 if v is None else -v if item.startswith("-") else v)
            )
        return parts

    groups.sort(key=key)
    totals = metrics({m: sum(f[m] for f in rows) for m in BASE})
    return groups, totals


@pytest.fixture
def db_path(tmp_path, monkeypatch) -> Path:
    path = build_db(tmp_path / "ads.db")
    monkeypatch.setattr(main, "DB_PATH", str(path))
    return path


def dump(path: Path) -> list[str]:
    """The database's schema and rows, but for the heartbeat's own table."""
    db = sqlite3.connect(path)
    try:
        return [line for line in db.iterdump() if "job_runs" not in line]
    finally:
        db.close()


@pytest.fixture
def client(db_path):
    """A running app on the fixture database; afterwards, the data must be unchanged."""
    before = dump(db_path)
    with TestClient(main.app) as client:
        yield client
    # No request changed a table; only job_runs was added.
    assert dump(db_path) == before


def check_page(response, params: dict) -> dict:
    """Assert that a /metrics response is the reference's page for these parameters."""
    assert response.status_code == 200, response.text
    groups, totals = reference(params)
    limit, offset = int(params.get("limit", 100)), int(params.get("offset", 0))
    body = response.json()
    assert body["data"] == groups[offset : offset + limit]
    assert body["totals"] == totals
    assert body["paging"]["total_rows"] == len(groups)
    assert (body["paging"]["limit"], body["paging"]["offset"]) == (limit, offset)
    assert (body["paging"]["next"] is None) == (offset + limit >= len(groups))
    for row in body["data"]:  # the grouped fields, in group_by order, then the metrics
        assert list(row) == (values(params, "group_by") or GRAIN) + METRICS
    return body


QUERIES = {
    "default: one row per fact row": {},
    "a page further on": {"limit": "7", "offset": "3"},
    "a date range": {"start_date": "2025-02-01", "end_date": "2025-02-03"},
    "only a start date": {"start_date": "2025-02-10"},
    "only an end date": {"end_date": "2025-01-29"},
    "one day": {"start_date": "2025-02-05", "end_date": "2025-02-05"},
    "filters ignore case, take commas": {"region": "alpha, MIKE"},
    "filters repeat, and combine": {"region": ["Alpha", "Zulu"], "platform": "instagram"},
    "every filter at once": {"region": "Zulu", "age_group": "18-24", "gender": "FEMALE",
                             "platform": "Facebook", "placement": "Feed,Reels", "device_type": "Mobile"},
    "by date": {"group_by": "date"},
    "by date, newest first": {"group_by": "date", "sort": "-date"},
    "by week": {"group_by": "week"},
    "by month and region": {"group_by": "month,region"},
    "a period after a dimension": {"group_by": ["region", "week"]},
    "by month, latest first": {"group_by": "month", "sort": "-month"},
    "top platforms by cost": {"group_by": "platform", "sort": "-cost"},
    "ctr ascending, nulls last": {"group_by": "date,region", "sort": "ctr"},
    "ctr descending, nulls last": {"group_by": "date,region", "sort": "-ctr"},
    "a dimension descending": {"group_by": "device_type,age_group", "sort": "-age_group"},
    "two sort keys, a page": {"group_by": "region,gender,placement", "sort": "-cpa,likes",
                              "limit": "5", "offset": "2"},
    "fact rows by impressions": {"sort": "-impressions", "limit": "20"},
    "the grain in another order": {"group_by": "placement,platform,device_type,gender,age_group,region,date"},
    "weeks, filtered, by cpm": {"group_by": "week,platform", "sort": "-cpm", "start_date": "2025-02-01",
                                "placement": "Feed,Reels"},
    "cpc and conversion rate": {"group_by": "age_group,gender", "sort": "cpc,-conversion_rate"},
    "a value with no rows": {"region": "Quebec"},
    "dates with no rows": {"start_date": "2026-01-01"},
    "the largest page": {"limit": "1000"},
    "an offset past the end": {"group_by": "platform", "offset": "50"},
    "the largest offset": {"offset": str(2**63 - 1)},
}  # fmt: skip


@pytest.mark.parametrize("params", QUERIES.values(), ids=QUERIES.keys())
def test_metrics_match_the_reference(client, params):
    check_page(client.get("/metrics", params=params), params)


@pytest.mark.parametrize(
    "params",
    [{"limit": "97"}, {"group_by": "week,device_type", "sort": "-cost", "limit": "4"},
     {"group_by": "date,placement", "sort": "-ctr", "limit": "9", "region": "Zulu"}],
)  # fmt: skip
def test_following_next_walks_the_whole_result_once(client, params):
    groups, _ = reference(params)
    seen, url = [], "/metrics"
    response = client.get(url, params=params)
    while True:
        body = response.json()
        seen += body["data"]
        if body["paging"]["next"] is None:
            break
        response = client.get(body["paging"]["next"])
    assert seen == groups
    assert len({tuple(sorted(row.items())) for row in seen}) == len(seen)


def test_next_keeps_the_query_string(client):
    response = client.get("/metrics?region=alpha,Zulu&group_by=date&limit=5&offset=5")
    assert (
        response.json()["paging"]["next"]
        == "/metrics?region=alpha,Zulu&group_by=date&limit=5&offset=10"
    )


def test_zero_denominators_give_null_ratios(client):
    body = client.get("/metrics", params={"group_by": "date,region", "start_date": "2025-02-03",
                                          "end_date": "2025-02-03", "region": "Mike"}).json()  # fmt: skip
    assert body["data"][0]["impressions"] == 0
    assert {
        k: body["data"][0][k] for k in ("ctr", "cpc", "cpm", "cpa", "conversion_rate")
    } == dict.fromkeys(("ctr", "cpc", "cpm", "cpa", "conversion_rate"))


def test_no_rows_gives_zero_totals_and_null_ratios(client):
    response = client.get("/metrics?region=quebec")
    assert response.status_code == 200
    assert response.json() == {
        "data": [],
        "totals": {"impressions": 0, "clicks": 0, "cost": 0.0, "conversions": 0, "likes": 0,
                   "ctr": None, "cpc": None, "cpm": None, "cpa": None, "conversion_rate": None},
        "paging": {"limit": 100, "offset": 0, "total_rows": 0, "next": None},
    }  # fmt: skip


def test_output_uses_the_tables_spelling(client):
    row = client.get("/metrics?gender=FEMALE&group_by=gender").json()["data"][0]
    assert row["gender"] == "female"


def test_a_fact_table_without_a_unique_key_gives_the_same_answers(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(
        main, "DB_PATH", str(build_db(tmp_path / "nokey.db", unique_key=False))
    )
    with TestClient(main.app) as client:
        for params in (
            {},
            {"limit": "30", "offset": "400", "sort": "-cost"},
            {"group_by": "week"},
        ):
            check_page(client.get("/metrics", params=params), params)


def test_dimensions_lists_values_in_table_order(client):
    response = client.get("/dimensions")
    assert response.status_code == 200
    assert response.json() == {
        "date": {"first": "2025-01-27", "last": "2025-02-15"},
        **{dim: [names[i] for i in sorted(names)] for dim, (*_, names) in DIMS.items()},
    }


def test_health_reports_the_database_and_the_heartbeat(client):
    # The start-up run lands a moment after start-up; until then last_run is null.
    response = wait_until(
        lambda: (r := client.get("/health")).json()["scheduler"]["last_run"] and r
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["scheduler"]["running"] is True
    assert body["scheduler"]["interval_seconds"] == 21600
    assert body["scheduler"]["last_run"]["slot"].endswith(("T00:00:00+00:00", "T06:00:00+00:00",
                                                          "T12:00:00+00:00", "T18:00:00+00:00"))  # fmt: skip


INJECTION = "x' OR '1'='1"
BAD = {  # name -> (query string, parameter in loc, error type, text the message must hold)
    **{f"sql injection in {dim}": (f"{dim}={INJECTION}", dim, "literal_error", INJECTION)
       for dim in DIMS},
    "sql injection in group_by": ("group_by=region;DROP TABLE dim_region", "group_by", "literal_error",
                                  "region;DROP TABLE dim_region"),
    "sql injection in sort": ("sort=cost)--", "sort", "literal_error", "cost)--"),
    "sql injection in a date": ("start_date=2025-01-01' --", "start_date", "date_parsing", "2025-01-01' --"),
    "union injection in region": ("region=a UNION SELECT 1", "region", "literal_error", "a UNION SELECT 1"),
    "unknown region lists the valid ones": ("region=Mars", "region", "literal_error", "Zulu, Alpha, Mike, Quebec"),
    "start after end": ("start_date=2025-02-02&end_date=2025-02-01", "end_date", "value_error", "2025-02-01"),
    "impossible date": ("start_date=2025-02-30", "start_date", "date_parsing", "2025-02-30"),
    "month 13": ("end_date=2025-13-01", "end_date", "date_parsing", "2025-13-01"),
    "date without dashes": ("start_date=20250101", "start_date", "date_parsing", "20250101"),
    "date with a time": ("start_date=2025-01-01T00:00", "start_date", "date_parsing", "2025-01-01T00:00"),
    "week date": ("start_date=2025-W01-1", "start_date", "date_parsing", "2025-W01-1"),
    "empty date": ("end_date=", "end_date", "date_parsing", "end_date"),
    "limit 0": ("limit=0", "limit", "greater_than_equal", "'0'"),
    "limit 1001": ("limit=1001", "limit", "less_than_equal", "'1001'"),
    "limit -1": ("limit=-1", "limit", "greater_than_equal", "'-1'"),
    "limit 1e3": ("limit=1e3", "limit", "int_parsing", "'1e3'"),
    "limit abc": ("limit=abc", "limit", "int_parsing", "'abc'"),
    "limit 1.5": ("limit=1.5", "limit", "int_parsing", "'1.5'"),
    "empty limit": ("limit=", "limit", "int_parsing", "limit"),
    "offset -1": ("offset=-1", "offset", "greater_than_equal", "'-1'"),
    "offset past SQLite's integers": (f"offset={2**63}", "offset", "less_than_equal", str(2**63)),
    "group_by date and week": ("group_by=date,week", "group_by", "value_error", "'week'"),
    "group_by week and month": ("group_by=week&group_by=month", "group_by", "value_error", "'month'"),
    "unknown group_by": ("group_by=country", "group_by", "literal_error", "'country'"),
    "group_by twice the same": ("group_by=region,region", "group_by", "value_error", "'region'"),
    "group_by twice, repeated": ("group_by=platform&group_by=platform", "group_by", "value_error", "'platform'"),
    "empty group_by": ("group_by=", "group_by", "string_too_short", "group_by"),
    "sort by a field not in the output": ("group_by=platform&sort=region", "sort", "literal_error", "'region'"),
    "sort by an unknown field": ("sort=-profit", "sort", "literal_error", "'-profit'"),
    "sort twice the same": ("sort=cost,-cost", "sort", "value_error", "'-cost'"),
    "region twice": ("region=Zulu,zulu", "region", "value_error", "'zulu'"),
    "empty region": ("region=", "region", "string_too_short", "region"),
    "trailing comma": ("platform=Facebook,", "platform", "string_too_short", "platform"),
    "unknown parameter": ("country=FR", "country", "extra_forbidden", "'FR'"),
    "misspelt parameter": ("regoin=Zulu", "regoin", "extra_forbidden", "'Zulu'"),
    "a 10 KB value": ("placement=" + "x" * 10_000, "placement", "literal_error", "'" + "x" * 60 + "…'"),
    "control characters": ("device_type=%00%1b[2J", "device_type", "literal_error", "'\\x00\\x1b[2J'"),
    "unicode lookalike": ("platform=Ｆacebook", "platform", "literal_error", "'Ｆacebook'"),
}  # fmt: skip


@pytest.mark.parametrize("query, param, error_type, text", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_422_naming_the_parameter_and_value(
    client, query, param, error_type, text
):
    response = client.get(f"/metrics?{query}")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", param]
    assert error["type"] == error_type
    assert error["msg"].startswith(param)
    assert text in error["msg"]


def test_several_bad_parameters_are_reported_together(client):
    response = client.get("/metrics?limit=0&offset=-1&colour=red")
    assert response.status_code == 422
    assert [e["loc"][1] for e in response.json()["detail"]] == [
        "limit",
        "offset",
        "colour",
    ]


def test_openapi_documents_every_parameter_and_response(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/metrics"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {
        "start_date",
        "end_date",
        *DIMS,
        "group_by",
        "sort",
        "limit",
        "offset",
    }
    assert all(p["in"] == "query" and p.get("description") for p in params.values())
    assert (
        params["limit"]["schema"]["minimum"],
        params["limit"]["schema"]["maximum"],
    ) == (1, 1000)
    assert params["offset"]["schema"]["minimum"] == 0
    assert params["group_by"]["schema"]["items"]["enum"] == [
        "date",
        "week",
        "month",
        *DIMS,
    ]
    assert {"200", "422", "503"} <= set(operation["responses"])
    page = operation["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"
    ]
    assert page.endswith("/MetricsPage")


def run(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], check=False, cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def one_line_start_up_failure(db: Path) -> str:
    """Start `uvicorn main:app` on `db`; return the one line it stops with."""
    result = run("-m", "uvicorn", "main:app", "--port", "0", env={"ADS_DB": str(db)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = [
        line
        for line in result.stderr.splitlines()
        if "ERROR" in line and "startup failed" not in line
    ]
    return line


def test_uvicorn_with_a_missing_database_stops_with_one_line(tmp_path):
    line = one_line_start_up_failure(tmp_path / "none.db")
    assert "none.db not found; create it with: python seed.py --db" in line


def test_uvicorn_with_a_file_that_is_not_a_database_stops_with_one_line(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    assert (
        "junk.db cannot be read: file is not a database"
        in one_line_start_up_failure(tmp_path / "junk.db")
    )


def test_uvicorn_with_a_missing_table_stops_with_one_line(tmp_path):
    sqlite3.connect(tmp_path / "empty.db").execute(
        "CREATE TABLE t (x)"
    ).connection.close()
    assert "no such table: fact_ad_metrics_daily" in one_line_start_up_failure(
        tmp_path / "empty.db"
    )


def test_seed_is_deterministic_and_realistic(tmp_path):
    a = seed.seed(tmp_path / "a.db", days=10, seed=3)
    b = seed.seed(tmp_path / "b.db", days=10, seed=3)
    seed.seed(tmp_path / "c.db", days=10, seed=4)
    dump = "SELECT * FROM fact_ad_metrics_daily ORDER BY 1, 2, 3, 4, 5, 6, 7"
    rows = {
        n: sqlite3.connect(tmp_path / f"{n}.db").execute(dump).fetchall() for n in "abc"
    }
    assert a == b == len(rows["a"]) and rows["a"] == rows["b"] != rows["c"]
    db = sqlite3.connect(tmp_path / "a.db")
    wrong_places = db.execute(
        "SELECT count(*) FROM fact_ad_metrics_daily JOIN dim_platform USING (platform_id) "
        "JOIN dim_placement USING (placement_id) JOIN dim_device_type USING (device_type_id) "
        "WHERE (placement_name IN ('Stories', 'Reels', 'Explore') AND device_type_name = 'Desktop') "
        "OR (platform_name = 'Audience Network' AND placement_name NOT IN "
        "('Native/Banner/Interstitial', 'Rewarded Video')) "
        "OR (placement_name = 'Right Column' AND device_type_name != 'Desktop')"
    ).fetchone()[0]
    assert wrong_places == 0
    assert db.execute("SELECT count(*) FROM fact_ad_metrics_daily WHERE conversions > clicks "
                      "OR likes > impressions OR cost < 0").fetchone()[0] == 0  # fmt: skip
    assert [r[0] for r in db.execute("SELECT age_range FROM dim_age_group ORDER BY age_id")] == [
        "18-24", "25-34", "35-44", "45-54", "55-64", "65+"]  # fmt: skip


def test_seed_cli_defaults_size_and_refusals(tmp_path):
    result = run("seed.py", "--db", str(tmp_path / "ads.db"))
    assert result.returncode == 0, result.stderr
    rows = (
        sqlite3.connect(tmp_path / "ads.db")
        .execute("SELECT count(*) FROM fact_ad_metrics_daily")
        .fetchone()[0]
    )
    assert 200_000 <= rows <= 500_000
    assert f"seeded {rows:,} rows over 365 days in" in result.stdout
    again = run("seed.py", "--db", str(tmp_path / "ads.db"))
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    for bad in (
        ["--days", "0"],
        ["--density", "1.5"],
        ["--start", "2025-13-01"],
        ["--seed", "x"],
    ):
        result = run("seed.py", "--db", str(tmp_path / "other.db"), *bad)
        assert result.returncode == 2 and result.stderr.strip(), bad
    assert not (tmp_path / "other.db").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_a_fact_row_with_an_unknown_id_is_kept_with_a_null_name(db_path):
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO fact_ad_metrics_daily VALUES (?, 99, 4, 2, 9, 1, 8, 10, 1, 0.5, 0, 0)",
               [DATE_IDS["2025-01-27"]])  # fmt: skip
    db.commit()
    with TestClient(main.app) as client:
        body = client.get(
            "/metrics?group_by=region&start_date=2025-01-27&end_date=2025-01-27"
        ).json()
    assert [row["region"] for row in body["data"]] == ["Zulu", "Alpha", "Mike", None]
    assert body["totals"]["impressions"] == 10 + sum(
        f["impressions"] for f in FACTS if f["date"] == "2025-01-27"
    )


def wait_until(condition, timeout: float = 10.0):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return result


def job_runs(path: Path) -> list[tuple]:
    """The heartbeat's rows, in slot order; none if the table is not there yet."""
    db = sqlite3.connect(path)
    try:
        return db.execute(
            "SELECT slot, ran_at, pid FROM job_runs ORDER BY slot"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def heartbeats(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("heartbeat slot=")
    ]


def slot_at(timestamp: float, interval: int) -> str:
    return datetime.fromtimestamp(timestamp // interval * interval, UTC).isoformat()


def fire_times_after_start(count: int) -> tuple[list[datetime], dict]:
    """Start the app; once its catch-up run is done, return its next fire times and health."""
    with TestClient(main.app) as client:
        scheduler = client.app.state.heartbeat.scheduler
        wait_until(
            lambda: (
                scheduler.get_job("heartbeat").next_run_time.timestamp() > time.time()
            )
        )
        job = scheduler.get_job("heartbeat")
        times = [job.next_run_time]
        while len(times) < count:
            times.append(job.trigger.get_next_fire_time(times[-1], times[-1]))
        return times, client.get("/health").json()["scheduler"]


@pytest.mark.parametrize("interval", [7, 21600])
def test_heartbeat_fire_times_stay_on_the_epoch_grid_across_restarts(
    db_path, monkeypatch, interval
):
    monkeypatch.setattr(main, "HEARTBEAT_INTERVAL_SECONDS", interval)
    for _ in range(2):  # a start, then a restart
        fire_times, health = fire_times_after_start(4)
        stamps = [t.timestamp() for t in fire_times]
        assert all(t % interval == 0 for t in stamps)
        assert [b - a for a, b in pairwise(stamps)] == [interval] * 3
        assert 0 < stamps[0] - time.time() <= interval
        assert datetime.fromisoformat(health["next_run_at"]) == fire_times[0]
    if interval == 21600:
        assert fire_times[0].hour in (0, 6, 12, 18) and fire_times[0].minute == 0


def test_two_instances_on_one_file_record_each_slot_once(db_path, caplog):
    sqlite3.connect(db_path).execute(
        "CREATE TABLE job_runs (slot TEXT PRIMARY KEY, ran_at TEXT NOT NULL, pid INTEGER NOT NULL)"
    ).connection.close()

    async def race():
        beats = [main.Heartbeat(str(db_path), 3600), main.Heartbeat(str(db_path), 3600)]
        await asyncio.gather(*(beat.run() for beat in beats))

    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        for _ in range(10):
            sqlite3.connect(db_path, isolation_level=None).execute(
                "DELETE FROM job_runs"
            ).connection.close()
            caplog.clear()
            asyncio.run(race())
            assert len(job_runs(db_path)) == 1
            assert len(heartbeats(caplog)) == 1
            assert not [
                r for r in caplog.records if r.levelno >= logging.WARNING
            ]  # losing is normal


def test_the_latest_slot_runs_at_start_if_missing_and_not_again(db_path, caplog):
    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        with TestClient(main.app):
            [(slot, ran_at, pid)] = wait_until(lambda: job_runs(db_path))
        assert slot == slot_at(datetime.fromisoformat(ran_at).timestamp(), 21600)
        assert pid == os.getpid()
        assert heartbeats(caplog) == [f"heartbeat slot={slot} ran_at={ran_at}"]
        caplog.clear()
        with TestClient(main.app) as client:
            wait_until(
                lambda: (
                    client.app.state.heartbeat.state()["next_run_at"]
                    > datetime.now(UTC).isoformat()
                )
            )
        assert job_runs(db_path) == [(slot, ran_at, pid)]
        assert heartbeats(caplog) == []


def test_a_claim_waiting_for_the_write_lock_blocks_no_request(db_path, monkeypatch):
    monkeypatch.setattr(main, "HEARTBEAT_INTERVAL_SECONDS", 2)
    with TestClient(main.app) as client:
        wait_until(lambda: job_runs(db_path))
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # the write lock: the next claim has to wait
        due = (time.time() // 2 + 1) * 2
        slowest = 0.0
        while time.time() < due + 0.8:  # the run for `due` has started, and waits
            for url in ("/metrics?group_by=platform&sort=-cost", "/health"):
                began = time.perf_counter()
                assert client.get(url).status_code == 200
                slowest = max(slowest, time.perf_counter() - began)
        assert slot_at(due, 2) not in [slot for slot, _, _ in job_runs(db_path)]
        released = time.time()
        locker.execute("COMMIT")
        runs = wait_until(
            lambda: {slot: ran_at for slot, ran_at, _ in job_runs(db_path)}.get(
                slot_at(due, 2)
            )
        )
    assert slowest < 0.1
    # It started on time, and was recorded once the lock was released.
    assert due <= datetime.fromisoformat(runs).timestamp() < released


def test_a_failing_run_is_logged_with_its_traceback_and_the_next_slot_runs(
    db_path, monkeypatch, caplog
):
    monkeypatch.setattr(main, "HEARTBEAT_INTERVAL_SECONDS", 1)
    with (
        caplog.at_level(logging.INFO, logger="ad_metrics"),
        TestClient(main.app) as client,
    ):
        wait_until(lambda: job_runs(db_path))
        db = sqlite3.connect(db_path, isolation_level=None)
        db.execute("CREATE TRIGGER no_heartbeat BEFORE INSERT ON job_runs "
                   "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")  # fmt: skip
        failure = wait_until(
            lambda: [r for r in caplog.records if r.levelno == logging.ERROR]
        )[0]
        assert client.get("/metrics?group_by=month").status_code == 200
        assert client.get("/health").status_code == 200
        db.execute("DROP TRIGGER no_heartbeat")
        failed_at = time.time()
        wait_until(
            lambda: (
                datetime.fromisoformat(job_runs(db_path)[-1][1]).timestamp() > failed_at
            )
        )
    assert failure.getMessage().endswith("failed") and failure.exc_info
    assert "injected failure" in caplog.text and "Traceback" in caplog.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db: Path, log: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """Start `uvicorn main:app` on `db` as a subprocess; return it and its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-W", "default", "-m", "uvicorn", "main:app", "--port", str(port), *args],
        cwd=HERE, env={**os.environ, "ADS_DB": str(db), **env},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def test_two_workers_record_each_slot_once_and_log_it_once(tmp_path):
    db = build_db(tmp_path / "ads.db")
    server, _ = serve(
        db, tmp_path / "server.log", "--workers", "2", HEARTBEAT_INTERVAL_SECONDS="2"
    )
    time.sleep(8)  # about 7 s of slots, after the workers start
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=10)
    runs = job_runs(db)
    stamps = [datetime.fromisoformat(slot).timestamp() for slot, _, _ in runs]
    assert len(stamps) >= 3
    gaps = [b - a for a, b in pairwise(stamps)]
    assert gaps == [2] * len(gaps)  # none missing, none twice
    lines = [
        line
        for line in (tmp_path / "server.log").read_text().splitlines()
        if "heartbeat slot=" in line
    ]
    assert sorted(line.split("slot=")[1].split()[0] for line in lines) == [
        slot for slot, _, _ in runs
    ]
    assert len({pid for _, _, pid in runs}) <= 2


def test_sigterm_under_load_during_a_heartbeat_run_stops_cleanly(tmp_path):
    import httpx

    db = build_db(tmp_path / "ads.db")
    server, url = serve(db, tmp_path / "server.log", HEARTBEAT_INTERVAL_SECONDS="4")
    wait_until(
        lambda: job_runs(db) if server.poll() is None else pytest.fail("server died")
    )
    stop, answered = threading.Event(), []

    def load():
        with httpx.Client(base_url=url) as http:
            while not stop.is_set():
                try:
                    answered.append(
                        http.get("/metrics?group_by=week,region&sort=-cpm").status_code
                    )
                except httpx.HTTPError:
                    pass  # the server is going away

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the next run's claim waits for this lock...
    time.sleep((time.time() // 4 + 1) * 4 - time.time() + 0.3)  # ...and is waiting now
    server.send_signal(signal.SIGTERM)
    began = time.monotonic()
    status = server.wait(timeout=10)
    stopped_in = time.monotonic() - began
    stop.set()
    for client in clients:
        client.join()
    locker.execute("ROLLBACK")
    log = (tmp_path / "server.log").read_text()
    assert stopped_in < 5
    assert status in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log
    # The run waiting for the lock was stopped, and said so.
    assert "not recorded: the server is stopping" in log
    for bad in ("Traceback", "ResourceWarning", "Task was destroyed", "ERROR"):
        assert bad not in log
    assert answered and set(answered) == {200}
    assert all(None not in row for row in job_runs(db))  # whole rows only


def test_query_connections_cannot_write(client):
    async def try_to_write():
        refusals = []
        for connection in client.app.state.db.connections:
            for sql in ("DELETE FROM dim_region", "UPDATE fact_ad_metrics_daily SET cost = 0",
                        "CREATE TABLE x (y)", "DROP TABLE dim_gender"):  # fmt: skip
                with pytest.raises(sqlite3.OperationalError) as refused:
                    await connection.execute(sql)
                refusals.append(str(refused.value))
        return refusals

    assert set(client.portal.call(try_to_write)) == {
        "attempt to write a readonly database"
    }


def test_a_query_past_the_time_limit_is_stopped_and_the_connection_still_works(
    tmp_path, monkeypatch
):
    seed.seed(tmp_path / "big.db", days=30, density=0.5)
    monkeypatch.setattr(main, "DB_PATH", str(tmp_path / "big.db"))
    # One connection per lane, so that the next request reuses the interrupted one.
    monkeypatch.setattr(main, "LANES", {"light": 1, "heavy": 1})
    monkeypatch.setattr(main, "QUERY_TIMEOUT_SECONDS", 0.01)
    heavy = "/metrics?group_by=region,age_group,gender,platform,placement,device_type&sort=-ctr"
    with TestClient(main.app) as client:
        response = client.get(heavy)
        assert response.status_code == 503
        assert response.json() == {"detail": "the query ran longer than 0.01 s and was stopped; "
                                   "narrow the date range, add filters or group by fewer fields"}  # fmt: skip
        client.app.state.db.timeout = 10
        assert client.get(heavy).status_code == 200
        assert (
            client.get("/metrics?group_by=platform").json()["paging"]["total_rows"] == 4
        )


def nice_of(thread_id: int) -> int:
    return int(
        Path(f"/proc/self/task/{thread_id}/stat")
        .read_text()
        .rsplit(")", 1)[1]
        .split()[16]
    )


def test_heavy_queries_run_apart_at_a_lower_priority(client, monkeypatch):
    db = client.app.state.db
    if sys.platform == "linux":  # a thread per heavy connection, yielding the CPU
        nices = [nice_of(int(thread)) for thread in os.listdir("/proc/self/task")]
        assert nices.count(10) == main.LANES["heavy"]
    # Now the whole fixture is a heavy query, and one day in one region is not.
    monkeypatch.setattr(main, "HEAVY_ROWS", 100)
    db.timeout = 0.2
    taken = [
        client.portal.call(db.idle["heavy"].get) for _ in range(main.LANES["heavy"])
    ]
    response = client.get("/metrics?group_by=platform")  # heavy, and its lane is busy
    assert response.status_code == 503
    assert response.json() == {
        "detail": "every connection stayed busy for 0.2 s; retry later"
    }
    light = {"start_date": "2025-02-01", "end_date": "2025-02-01", "region": "Zulu"}
    check_page(client.get("/metrics", params=light), light)  # the light lane answers
    for connection in taken:
        db.idle["heavy"].put_nowait(connection)
    check_page(client.get("/metrics?group_by=platform"), {"group_by": "platform"})


def status_of(client) -> tuple[int, int]:
    return client.get("/metrics?group_by=platform").status_code, client.get(
        "/health"
    ).status_code


def test_a_removed_database_gives_503_until_a_good_file_is_back(db_path):
    with TestClient(main.app) as client:
        assert status_of(client) == (200, 200)
        db_path.unlink()
        wait_until(lambda: status_of(client) == (503, 503))
        assert (
            "is missing: No such file or directory"
            in client.get("/metrics").json()["detail"]
        )
        health = client.get("/health").json()
        assert health["status"] == "unavailable" and "is missing" in health["reason"]
        build_db(db_path)
        wait_until(lambda: status_of(client) == (200, 200))
        check_page(client.get("/metrics?group_by=week"), {"group_by": "week"})


def test_a_database_corrupted_in_place_gives_503_until_it_is_mended(db_path):
    good = db_path.read_bytes()
    with TestClient(main.app) as client:
        assert status_of(client) == (200, 200)
        with db_path.open("r+b") as f:  # the same file, its content overwritten
            f.write(b"this is no longer a database" * 200)
        wait_until(lambda: status_of(client) == (503, 503))
        assert (
            "cannot be read: file is not a database"
            in client.get("/metrics").json()["detail"]
        )
        db_path.write_bytes(good)
        wait_until(lambda: status_of(client) == (200, 200))
        check_page(client.get("/metrics?sort=-cost"), {"sort": "-cost"})


@pytest.mark.parametrize("previous", [False, True])
def test_a_seed_killed_mid_run_leaves_the_previous_database_or_nothing(
    tmp_path, previous
):
    target = tmp_path / "ads.db"
    if previous:
        seed.seed(target, days=3)
        before = dump(target)
    process = subprocess.Popen([sys.executable, "seed.py", "--db", str(target), "--days", "365",
                                "--density", "0.45", "--force"], cwd=HERE)  # fmt: skip
    wait_until(lambda: list(tmp_path.glob(".ads.db.*.tmp")))  # it is writing
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    if previous:
        assert dump(target) == before
    else:
        assert not target.exists()


ANY_TEXT = st.one_of(
    st.text(max_size=40),  # any code point: control characters, right-to-left marks...
    st.sampled_from(["", ",", ",,", "-", "--cost", "0000-01-01", "9" * 25, "%", "%ZZ", "%00",
                     "%FF%FE", "' OR 1=1 --", "x" * 10_000]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)  # fmt: skip
EDGES = st.sampled_from(
    [-1, 0, 1, 1000, 1001, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30]
).map(str)
VALID = st.fixed_dictionaries(  # a well-formed query, any subset of the parameters
    {},
    optional={
        "start_date": st.dates(date(2025, 1, 1), date(2025, 1, 31)).map(date.isoformat),
        "end_date": st.dates(date(2025, 2, 1), date(2025, 3, 1)).map(date.isoformat),
        **{dim: st.lists(st.sampled_from(list(names.values())).map(str.upper), min_size=1, max_size=2,
                         unique=True).map(",".join) for dim, (*_, names) in DIMS.items()},
        "group_by": st.tuples(st.sampled_from(["", "date,", "week,", "month,"]),
                              st.lists(st.sampled_from(list(DIMS)), min_size=1, max_size=3, unique=True))
                      .map(lambda t: t[0] + ",".join(t[1])),
        "sort": st.lists(st.sampled_from(METRICS), min_size=1, max_size=2, unique=True)
                  .map(lambda fields: ",".join("-" * (len(f) % 2) + f for f in fields)),
        "limit": st.integers(1, 1000).map(str),
        "offset": st.one_of(st.integers(0, 3000), st.just(2**63 - 1)).map(str),
    },
)  # fmt: skip
PARAMETERS = ["start_date", "end_date", *DIMS, "group_by", "sort", "limit", "offset"]
# sampled_from draws evenly, so repeats set the odds: mostly GET /metrics, mostly known
# names (so an odd value meets its own validation), mostly nothing appended.
ODD = st.tuples(
    st.sampled_from([*PARAMETERS * 3, "", "Offset", "group-by", "limit "])
    | st.text(max_size=8),
    EDGES | ANY_TEXT,
)
GARBAGE = [
    "&",
    "&&=",
    "&%",
    "&%zz=1",
    "&a=b=c",
    "&=x",
    "&limit",
]  # appended as they are


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(["GET"] * 20 + ["POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    path=st.sampled_from(
        ["/metrics"] * 20 + ["/dimensions", "/health", "/metrics/", "/nope"]
    ),
    valid=VALID,
    odd=st.lists(
        ODD, max_size=2
    ),  # one or two odd values, each reaching as deep as it can
    raw=st.sampled_from([""] * 10 + GARBAGE),
)
def test_no_request_crashes_the_service(client, method, path, valid, odd, raw):
    params = [*valid.items(), *odd]
    query = (
        "&".join(f"{quote(k, safe='')}={quote(v, safe=',')}" for k, v in params) + raw
    )
    response = client.request(method, f"{path}?{query}")
    known = path in ("/metrics", "/dimensions", "/health")
    if not known:
        assert response.status_code == 404
    elif method != "GET":
        assert response.status_code == 405
    else:
        assert response.status_code in (200, 422)
    if method == "HEAD":
        return
    body = response.json()
    if response.status_code == 422:
        for error in body["detail"]:
            assert (
                set(error) >= {"type", "loc", "msg", "input"}
                and error["loc"][0] == "query"
            )
            assert error["msg"].startswith(str(error["loc"][-1]))
    elif response.status_code in (404, 405):
        assert isinstance(body["detail"], str)
    elif path == "/metrics":
        assert (
            set(body) == {"data", "totals", "paging"}
            and len(body["data"]) <= body["paging"]["limit"]
        )
        assert set(body["totals"]) == set(METRICS)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(params=VALID)
def test_any_valid_query_matches_the_reference(client, params):
    check_page(client.get("/metrics", params=params), params)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("PORT=abc", "PORT must be a positive int, not 'abc'"),
        (
            "HEARTBEAT_INTERVAL_SECONDS=0",
            "HEARTBEAT_INTERVAL_SECONDS must be a positive int, not '0'",
        ),
        (
            "QUERY_TIMEOUT_SECONDS=-1",
            "QUERY_TIMEOUT_SECONDS must be a positive float, not '-1'",
        ),
        (
            "LOG_LEVEL=loud",
            "LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not 'LOUD'",
        ),
    ],
)
def test_a_bad_setting_stops_the_service_with_one_line_naming_it(
    db_path, setting, message
):
    name, value = setting.split("=")
    result = run(
        "-m",
        "uvicorn",
        "main:app",
        "--port",
        "0",
        env={"ADS_DB": str(db_path), name: value},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr


def test_python_main_py_seeds_a_missing_database_then_serves(tmp_path):
    import httpx

    port = free_port()
    env = {**os.environ, "ADS_DB": str(tmp_path / "new.db"), "PORT": str(port)}
    server = subprocess.Popen(
        [sys.executable, "main.py"],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        health = wait_until(
            lambda: probe(f"http://127.0.0.1:{port}/health"), timeout=60
        )
        assert health.status_code == 200 and health.json()["status"] == "ok"
        dims = httpx.get(f"http://127.0.0.1:{port}/dimensions").json()
        assert dims["date"] == {"first": "2025-01-01", "last": "2025-12-31"}
    finally:
        server.send_signal(signal.SIGTERM)
        log, _ = server.communicate(timeout=10)
    assert "new.db not found: seeding it" in log
    assert "seeded " in log and " rows over 365 days in " in log


def probe(url: str):
    """GET url; None if nothing answers yet."""
    import httpx

    try:
        return httpx.get(url)
    except httpx.TransportError:
        return None
