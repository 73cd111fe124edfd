"""The Ad Metrics API's specification, as tests, in main.py's order.

Every /metrics answer is compared with `reference()` (at the end of the file): an
independent reading of the contract in plain Python over the rows the fixture
database is built from. The fixture has sparse ids out of name order, dates whose ids
are shuffled, a name holding a comma and quotes, and fact rows whose ids are missing
from their dimension tables.
"""

import asyncio
import csv
import io
import logging
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from contextlib import suppress
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from itertools import pairwise, product
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

warnings.filterwarnings("ignore", message=".*httpx2.*")  # Starlette's TestClient notice
from fastapi.testclient import TestClient

import main
import seed

# Settings -------------------------------------------------------------------------


def test_settings_come_from_the_environment():
    env = {
        "ADS_DB": "/data/a.db",
        "HOST": "0.0.0.0",
        "PORT": "9000",
        "LOG_LEVEL": "debug",
        "HEARTBEAT_INTERVAL_SECONDS": "60",
        "QUERY_TIMEOUT_SECONDS": "2.5",
        "OTHER": "x",
    }
    assert main.Settings.from_env(env) == main.Settings(
        db_path="/data/a.db",
        host="0.0.0.0",
        port=9000,
        log_level="DEBUG",
        heartbeat_interval=60,
        query_timeout=2.5,
    )
    assert main.Settings.from_env({}) == main.Settings()
    assert main.Settings() == main.Settings(
        db_path="ads.db",
        host="127.0.0.1",
        port=8000,
        log_level="INFO",
        heartbeat_interval=21600,
        query_timeout=10,
    )
    fields = {"db_path": "/elsewhere.db", "port": "1"}  # a field's name is no variable
    assert main.Settings.from_env(fields) == main.Settings()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("PORT", "abc", "unable to parse string as an integer"),
        ("PORT", "0", "greater than or equal to 1"),
        ("PORT", "70000", "less than or equal to 65535"),
        ("HEARTBEAT_INTERVAL_SECONDS", "0", "greater than or equal to 1"),
        ("HEARTBEAT_INTERVAL_SECONDS", "inf", "valid integer"),
        ("QUERY_TIMEOUT_SECONDS", "-1", "greater than 0"),
        ("QUERY_TIMEOUT_SECONDS", "nan", "less than or equal to 3600"),
        ("QUERY_TIMEOUT_SECONDS", "inf", "less than or equal to 3600"),
        ("LOG_LEVEL", "loud", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ],
)
def test_a_bad_setting_stops_with_one_line_naming_it(name, value, message):
    with pytest.raises(SystemExit) as stop:
        main.Settings.from_env({name: value})
    line = str(stop.value)
    assert line.startswith(
        f"{name} {value.upper() if name == 'LOG_LEVEL' else value!r}"
    )
    assert message in line and "\n" not in line


def test_uvicorn_with_a_bad_setting_stops_with_that_line(db_path):
    result = run(
        "-m",
        "uvicorn",
        "main:app",
        "--port",
        "0",
        env={"ADS_DB": str(db_path), "QUERY_TIMEOUT_SECONDS": "nan"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "QUERY_TIMEOUT_SECONDS 'nan': Input should be less than or equal to 3600"
    )
    assert "Traceback" not in result.stderr


# The request model: every client error is a 422 that names the parameter ------------

INJECTION = "x' OR '1'='1"
BAD = {  # name -> (query string, parameter in loc, error type, text the message must hold)
    **{f"sql injection in {dim}": (f"{dim}={INJECTION}", dim, "literal_error", INJECTION)
       for dim in ["region", "age_group", "gender", "platform", "placement", "device_type"]},
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
    "group_by in another case": ("group_by=Region", "group_by", "literal_error", "'Region'"),
    "group_by twice the same": ("group_by=region,region", "group_by", "value_error", "'region'"),
    "group_by twice, repeated": ("group_by=platform&group_by=platform", "group_by", "value_error", "'platform'"),
    "empty group_by": ("group_by=", "group_by", "string_too_short", "group_by"),
    "sort by a field not in the output": ("group_by=platform&sort=region", "sort", "literal_error", "'region'"),
    "sort by an unknown field": ("sort=-profit", "sort", "literal_error", "'-profit'"),
    "sort twice the same": ("sort=cost,-cost", "sort", "value_error", "'-cost'"),
    "region twice": ("region=Zulu,zulu", "region", "value_error", "'zulu'"),
    "a dash is no sort order in a filter": ("region=Alpha,-Alpha", "region", "literal_error", "'-Alpha'"),
    "empty region": ("region=", "region", "string_too_short", "region"),
    "trailing comma": ("platform=Facebook,", "platform", "string_too_short", "platform"),
    "part of a name with a comma": ("placement=Native", "placement", "literal_error", "'Native'"),
    "unknown parameter": ("country=FR", "country", "extra_forbidden", "'FR'"),
    "misspelt parameter": ("regoin=Zulu", "regoin", "extra_forbidden", "'Zulu'"),
    "unknown format": ("format=xml", "format", "literal_error", "'xml'"),
    "unknown format, for a CSV": ("format=CSV", "format", "literal_error", "'CSV'"),
    "a 10 KB value": ("placement=" + "x" * 10_000, "placement", "literal_error", "'" + "x" * 60 + "…'"),
    "control characters": ("device_type=%00%1b[2J", "device_type", "literal_error", "'\\x00\\x1b[2J'"),
    "unicode lookalike": ("platform=Ｆacebook", "platform", "literal_error", "'Ｆacebook'"),
}  # fmt: skip


@pytest.mark.parametrize("query, param, error_type, text", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("format", ["json", "csv"])
def test_bad_input_is_a_422_naming_the_parameter_and_value(
    client, query, param, error_type, text, format
):
    url = f"/metrics?{query}"
    if format == "csv" and "format=" not in query:
        url += "&format=csv"
    response = client.get(url)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", param]
    assert error["type"] == error_type
    assert error["msg"].startswith(param)
    assert text in error["msg"]


WHOLE_422 = {  # a request, and every entry of its 422's detail
    "an unknown name, with the valid ones": ("region=Atlantis", [
        {"type": "literal_error", "loc": ["query", "region"], "input": ["Atlantis"],
         "msg": "region 'Atlantis' is not one of: Zulu, Alpha, Mike, Quebec"}]),
    "several bad parameters, together": ("limit=0&offset=-1&colour=red", [
        {"type": "greater_than_equal", "loc": ["query", "limit"], "input": "0",
         "ctx": {"ge": 1}, "msg": "limit '0': Input should be greater than or equal to 1"},
        {"type": "greater_than_equal", "loc": ["query", "offset"], "input": "-1",
         "ctx": {"ge": 0}, "msg": "offset '-1': Input should be greater than or equal to 0"},
        {"type": "extra_forbidden", "loc": ["query", "colour"], "input": "red",
         "msg": "colour 'red': Extra inputs are not permitted"}]),
    "a date that is not real": ("start_date=2025-02-30", [
        {"type": "date_parsing", "loc": ["query", "start_date"], "input": "2025-02-30",
         "msg": "start_date '2025-02-30' is not a real date"}]),
}  # fmt: skip


@pytest.mark.parametrize("query, detail", WHOLE_422.values(), ids=list(WHOLE_422))
def test_a_bad_request_is_a_whole_422(client, query, detail):
    response = client.get(f"/metrics?{query}")
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


# GET /metrics: every answer is the reference's ----------------------------------------

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
    "a name with a comma, whole": {"placement": 'native, banner & "interstitial"'},
    "a name with a comma, and another": {"placement": ['Native, Banner & "Interstitial"', "Feed"]},
    "by date": {"group_by": "date"},
    "by date, newest first": {"group_by": "date", "sort": "-date"},
    "by week": {"group_by": "week"},
    "by month and region": {"group_by": "month,region"},
    "a period after a dimension": {"group_by": ["region", "week"]},
    "by month, latest first": {"group_by": "month", "sort": "-month"},
    "by placement, names with commas": {"group_by": "placement"},
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
    "variant",
    ["no unique key", "date ids in date order", "extra columns named like ours",
     "counts stored as reals", "dimension rows loaded twice"],
)  # fmt: skip
def test_other_valid_files_give_the_same_answers(tmp_path, variant):
    path = build_db(tmp_path / "ads.db", variant)
    in_order = variant == "date ids in date order"
    with TestClient(main.create_app(main.Settings(db_path=str(path)))) as client:
        for params in [{}, {"limit": "30", "offset": "400", "sort": "-cost"},
                       {"group_by": "week"}, {"group_by": "month,region"},
                       {"group_by": "date", "sort": "-date"}, {"region": "Zulu"}]:  # fmt: skip
            check_page(
                client.get("/metrics", params=params), params, dates_in_order=in_order
            )


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "97"},
        {"group_by": "week,device_type", "sort": "-cost", "limit": "4"},
        {"group_by": "date,placement", "sort": "-ctr", "limit": "9", "region": "Zulu"},
    ],
)
def test_following_next_walks_the_whole_result_once(client, params):
    assert walk(client, params) == reference(params)[0]


def test_next_keeps_the_query_string(client):
    response = client.get("/metrics?region=alpha,Zulu&group_by=date&limit=5&offset=5")
    assert response.json()["paging"]["next"] == (
        "/metrics?region=alpha,Zulu&group_by=date&limit=5&offset=10"
    )


def test_zero_denominators_give_null_ratios(client):
    params = {
        "group_by": "date,region",
        "start_date": "2025-02-03",
        "end_date": "2025-02-03",
        "region": "Mike",
    }
    [row] = client.get("/metrics", params=params).json()["data"]
    assert row["impressions"] == row["clicks"] == row["conversions"] == 0
    assert [row[m] for m in main.RATIOS] == [None] * 5


def test_no_rows_gives_zero_totals_and_null_ratios(client):
    response = client.get("/metrics?region=quebec")
    assert response.status_code == 200
    assert response.json() == {
        "data": [],
        "totals": {
            "impressions": 0,
            "clicks": 0,
            "cost": 0.0,
            "conversions": 0,
            "likes": 0,
            "ctr": None,
            "cpc": None,
            "cpm": None,
            "cpa": None,
            "conversion_rate": None,
        },
        "paging": {"limit": 100, "offset": 0, "total_rows": 0, "next": None},
    }


def test_output_uses_the_tables_spelling(client):
    row = client.get("/metrics?gender=FEMALE&group_by=gender").json()["data"][0]
    assert row["gender"] == "female"


def test_a_fact_row_with_an_unknown_id_is_kept_with_a_null_name(client):
    body = client.get("/metrics?group_by=region").json()
    assert [row["region"] for row in body["data"]] == ["Zulu", "Alpha", "Mike", None]
    orphans = [f for f in FACTS if f["region"] == ORPHAN]
    assert orphans and body["data"][-1]["impressions"] == sum(
        f["impressions"] for f in orphans
    )


def test_a_name_stands_for_each_of_its_ids_in_any_case_and_a_null_name_for_none(
    db_path,
):
    with sqlite3.connect(db_path) as db:  # two ids named alike; an id with no name
        db.execute("UPDATE dim_region SET region_name = 'mike' WHERE region_id = 2")
        db.execute("UPDATE dim_region SET region_name = NULL WHERE region_id = 5")
    with TestClient(main.create_app(main.Settings(db_path=str(db_path)))) as client:
        assert client.get("/dimensions").json()["region"] == ["mike", "Mike", "Quebec"]
        body = client.get("/metrics?region=MIKE&group_by=region").json()
        assert [row["region"] for row in body["data"]] == ["mike", "Mike"]
        both = sum(f["impressions"] for f in FACTS if f["region"] in (2, 7))
        assert body["totals"]["impressions"] == both
        assert client.get("/metrics?region=None").status_code == 422


def test_an_id_column_that_is_no_key_never_doubles_a_row(tmp_path):
    path = tmp_path / "ads.db"
    seed.seed(path, days=3)
    with sqlite3.connect(path) as db:  # untyped ids, and 1 held again as '1'
        db.execute("ALTER TABLE dim_region RENAME TO old_region")
        db.execute("CREATE TABLE dim_region (region_id, region_name)")
        db.execute("INSERT INTO dim_region SELECT * FROM old_region ORDER BY 1")
        db.execute("INSERT INTO dim_region VALUES ('1', 'Region one again')")
        db.execute("DROP TABLE old_region")
        [(rows, regions)] = db.execute(
            "SELECT count(*), count(DISTINCT region_id) FROM fact_ad_metrics_daily"
        )
    with TestClient(main.create_app(main.Settings(db_path=str(path)))) as client:
        by_region = client.get("/metrics?group_by=region").json()["data"]
        assert len(by_region) == regions
        grain = client.get("/metrics?limit=1000").json()
        assert grain["paging"]["total_rows"] == rows
        assert len(grain["data"]) == min(1000, rows)


def test_a_null_count_counts_as_zero_and_a_name_that_is_a_number_is_text(tmp_path):
    path = build_db(tmp_path / "ads.db")
    [age_id] = [i for i, name in DIMS["age_group"][3].items() if name == "18-24"]
    with sqlite3.connect(path) as db:  # untyped names: 18 stays a number
        db.execute("ALTER TABLE dim_age_group RENAME TO old_age")
        db.execute("CREATE TABLE dim_age_group (age_id INTEGER PRIMARY KEY, age_range)")
        db.execute("INSERT INTO dim_age_group SELECT * FROM old_age")
        db.execute("UPDATE dim_age_group SET age_range = 18 WHERE age_id = ?", [age_id])
        db.execute(
            "UPDATE dim_age_group SET age_range = 0.1 + 0.2 WHERE age_id != ?", [age_id]
        )
        db.execute("DROP TABLE old_age")
        db.execute(
            "UPDATE fact_ad_metrics_daily SET impressions = NULL, clicks = NULL, "
            "cost = NULL, conversions = NULL, likes = NULL WHERE age_id = ?",
            [age_id],
        )
    with TestClient(main.create_app(main.Settings(db_path=str(path)))) as client:
        assert "18" in client.get("/dimensions").json()["age_group"]
        for query in ("", "group_by=age_group", "format=csv"):
            answer = client.get(f"/metrics?age_group=18&{query}")
            if query.endswith("csv"):
                rows = list(csv.DictReader(io.StringIO(answer.text)))
                assert rows and all(row["cost"] == "0.0" for row in rows)
                continue
            page = main.MetricsPage.model_validate(answer.json())
            assert page.data and {row.age_group for row in page.data} == {"18"}
            assert {(row.impressions, row.cost, row.ctr) for row in page.data} == {
                (0, 0.0, None)
            }
        [real] = [n for n in client.get("/dimensions").json()["age_group"] if n != "18"]
        listed = {"age_group": real, "group_by": "age_group"}  # 0.1 + 0.2, as listed
        by_age = client.get("/metrics", params=listed).json()["data"]
        assert [row["age_group"] for row in by_age] == [real]


@pytest.mark.parametrize(
    "value, shown",
    [("'2025-13-01'", "'2025-13-01'"), ("20250101", "'20250101'"),
     ("CAST('2025-01-01' AS BLOB)", "b'2025-01-01'")],
)  # fmt: skip
def test_a_date_that_is_not_a_yyyy_mm_dd_text_stops_start_up(tmp_path, value, shown):
    path = build_db(tmp_path / "ads.db")
    with sqlite3.connect(path) as db:
        db.execute(
            f"UPDATE dim_date SET date_value = {value} WHERE date_id = ?",
            [SHUFFLED_IDS[DAYS[0]]],
        )
    app = main.create_app(main.Settings(db_path=str(path)))
    with pytest.raises(main.StartupError) as stopped, TestClient(app):
        pass
    assert str(stopped.value) == (
        f"database {path} cannot be read: dim_date holds {shown}, not a YYYY-MM-DD date"
    )


def test_a_fact_row_with_an_unknown_date_matches_no_date_range(client):
    days = client.get("/metrics?group_by=date").json()["data"]
    assert days[0]["date"] is None  # nulls first, as SQL sorts them
    every_day = {"start_date": "2000-01-01", "end_date": "2099-12-31"}
    ranged = client.get("/metrics", params=every_day).json()["totals"]
    unknown = sum(f["impressions"] for f in FACTS if f["day"] is None)
    assert (
        unknown
        and ranged["impressions"] == sum(f["impressions"] for f in FACTS) - unknown
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(params=st.deferred(lambda: VALID))
def test_any_valid_query_matches_the_reference(client, params):
    check_page(client.get("/metrics", params=params), params)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(params=st.deferred(lambda: VALID), data=st.data())
def test_totals_never_depend_on_grouping_order_or_page(client, params, data):
    """Orphan ids of every dimension included: a filter's totals are its row in the
    unfiltered breakdown, and no group_by, sort, limit or offset changes the totals."""

    def totals(**more):
        return client.get("/metrics", params={**params, **more}).json()["totals"]

    plain = {
        k: v
        for k, v in params.items()
        if k not in ("group_by", "sort", "limit", "offset")
    }
    expected = client.get("/metrics", params=plain).json()["totals"]
    assert totals() == expected
    assert totals(group_by="month", sort="-cost", limit="1", offset="2") == expected
    dim = data.draw(st.sampled_from(list(DIMS)))
    rows = client.get(
        "/metrics", params={**plain, dim: [], "group_by": dim, "limit": "1000"}
    )
    for row in rows.json()["data"]:
        if row[dim] is not None:  # an unknown id has no name to filter by
            only = client.get("/metrics", params={**plain, dim: row[dim]}).json()[
                "totals"
            ]
            assert only == {m: row[m] for m in main.METRICS}


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
    valid=st.deferred(lambda: VALID),
    odd=st.lists(st.deferred(lambda: ODD), max_size=2),  # each as deep as it can reach
    raw=st.sampled_from(
        [""] * 10 + ["&", "&&=", "&%", "&%zz=1", "&a=b=c", "&=x", "&limit"]
    ),
)
def test_no_request_crashes_the_service_or_breaks_its_schema(
    client, method, path, valid, odd, raw
):
    pairs = [
        (k, v) for k, vs in valid.items() for v in ([vs] if isinstance(vs, str) else vs)
    ]
    query = "&".join(
        f"{quote(k, safe='')}={quote(v, safe=',')}" for k, v in [*pairs, *odd]
    )
    response = client.request(method, f"{path}?{query}{raw}")
    known = path in ("/metrics", "/dimensions", "/health")
    expected = 404 if not known else 405 if method != "GET" else response.status_code
    assert response.status_code == expected and expected in (200, 404, 405, 422)
    if method == "HEAD" or response.headers["content-type"].startswith("text/csv"):
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
    elif path == "/metrics":  # the body SQLite wrote holds to the documented model
        page = main.MetricsPage.model_validate(body)
        assert len(page.data) <= page.paging.limit and set(body["totals"]) == set(
            main.METRICS
        )


# CSV export ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"group_by": "placement,week", "sort": "-cpm"},
        {"group_by": "region", "region": "Mike,alpha"},
    ],
)
def test_a_csv_holds_every_row_the_json_pages_hold(client, params):
    response = client.get("/metrics", params={**params, "format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert (
        response.headers["content-disposition"] == 'attachment; filename="metrics.csv"'
    )
    assert "\r\n" in response.text and response.text.endswith("\r\n")
    header, *rows = list(csv.reader(io.StringIO(response.text)))
    pages = walk(client, {**params, "limit": "1000"})
    assert (
        header == list(pages[0]) == (values(params, "group_by") or GRAIN) + main.METRICS
    )
    assert len(rows) == len(pages) == len(reference(params)[0])
    for line, row in zip(rows, pages):
        assert [from_csv(text, row[name]) for text, name in zip(line, header)] == list(
            row.values()
        )


def test_a_csv_of_no_rows_is_its_header_line(client):
    response = client.get("/metrics?region=Quebec&group_by=region&format=csv")
    assert response.status_code == 200
    assert response.text == (
        "region,impressions,clicks,cost,conversions,likes,ctr,cpc,cpm,cpa,"
        "conversion_rate\r\n"
    )


def test_a_csv_with_limit_and_offset_is_that_page(client):
    params = {
        "group_by": "date,placement",
        "sort": "-clicks",
        "limit": "7",
        "offset": "5",
    }
    header, *rows = list(
        csv.reader(
            io.StringIO(client.get("/metrics", params={**params, "format": "csv"}).text)
        )
    )
    page = client.get("/metrics", params=params).json()["data"]
    assert [
        [from_csv(t, r[n]) for t, n in zip(line, header)] for line, r in zip(rows, page)
    ] == [list(r.values()) for r in page]
    assert len(rows) == 7


def test_a_csv_download_the_client_leaves_frees_everything_it_held(big_db):
    async def leave_three_times():
        database = main.Database(str(big_db), timeout=5, size=1)
        await database.check()
        snapshot, threads = database.snapshot(), threading.active_count()
        groups, rows, _, params = main.metrics_sql(main.MetricsQuery(), {}, snapshot)
        sql = f"WITH {groups} {rows}"
        try:
            for _ in range(3):  # a heavy export: a turn, and a connection of its own
                chunks = database.export(snapshot, sql, [*params, -1, 0], heavy=True)
                assert len(await anext(chunks)) == 1000
                await chunks.aclose()
                assert threading.active_count() == threads  # its thread has ended
                assert snapshot.pool.idle.qsize() == 1  # the pool's was never taken
            async with asyncio.timeout(1):  # and every turn is free again
                for _ in range(os.cpu_count() or 2):
                    await database.turns.acquire()
        finally:
            await database.close()

    asyncio.run(leave_three_times())


def test_the_time_limit_bounds_a_csv_s_first_rows_not_the_download(big_db):
    settings = main.Settings(db_path=str(big_db), query_timeout=0.1)
    with TestClient(main.create_app(settings)) as client:
        began = time.monotonic()
        response = client.get("/metrics?format=csv")
        took = time.monotonic() - began
        [[facts]] = sqlite3.connect(big_db).execute(
            "SELECT count(*) FROM fact_ad_metrics_daily"
        )
        assert response.status_code == 200 and response.text.count("\r\n") == facts + 1
        assert took > 0.1  # longer than the limit, and it still completed
        heavy = (
            "group_by=region,age_group,gender,platform,placement,device_type&sort=-ctr"
        )
        response = client.get(
            f"/metrics?format=csv&{heavy}"
        )  # its first row comes too late
        assert (
            response.status_code == 503
            and response.headers["content-type"] == "application/json"
        )


# Conditional requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["/metrics?group_by=week&sort=-cost", "/dimensions", "/metrics?format=csv"]
)
def test_an_answer_s_etag_brings_a_304_without_running_a_query(
    client, url, monkeypatch
):
    first = client.get(url)
    tag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    assert tag.startswith('"') and tag.endswith('"')

    def no_query(*args):
        raise AssertionError("a query ran")

    monkeypatch.setattr(main.Database, "fetch", no_query)
    monkeypatch.setattr(main.Database, "export", no_query)
    for header in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        again = client.get(url, headers={"If-None-Match": header})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == tag
    if url.startswith("/metrics"):  # while another tag does run the query
        with pytest.raises(AssertionError, match="a query ran"):
            client.get(url, headers={"If-None-Match": '"other"'})


def test_a_bad_request_is_a_422_whatever_tag_it_holds(client):
    response = client.get("/metrics?region=Atlantis", headers={"If-None-Match": "*"})
    assert response.status_code == 422


def test_each_request_has_its_own_tag(client):
    urls = [
        "/metrics",
        "/metrics?limit=5",
        "/metrics?limit=5&format=csv",
        "/metrics?group_by=week",
        "/dimensions",
    ]
    assert len({client.get(url).headers["etag"] for url in urls}) == len(urls)


def test_a_write_in_place_changes_every_tag_within_a_second(served, db_path):
    client = served
    tags = {
        url: client.get(url).headers["etag"]
        for url in ("/metrics?group_by=week", "/dimensions")
    }
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE fact_ad_metrics_daily SET likes = likes + 1 WHERE rowid = 1")
    changed_at = time.monotonic()
    for url, tag in tags.items():
        headers = {"If-None-Match": tag}
        wait_until(lambda u=url, h=headers: client.get(u, headers=h).status_code == 200)
    assert time.monotonic() - changed_at < 1.0


# GET /dimensions and GET /health -------------------------------------------------------


def test_dimensions_lists_values_in_table_order(client):
    response = client.get("/dimensions")
    assert response.status_code == 200
    assert response.json() == {
        "date": {"first": "2025-01-27", "last": "2025-02-15"},
        **{dim: [names[i] for i in sorted(names)] for dim, (*_, names) in DIMS.items()},
    }


def test_health_reports_the_database_and_the_heartbeat(client):
    # The start-up run lands a moment after start-up; until then last_run is null.
    body = wait_until(
        lambda: (b := client.get("/health").json())["scheduler"]["last_run"] and b
    )
    [(slot, ran_at, _)] = job_runs(client.app.state.settings.db_path)
    assert body == {
        "status": "ok",
        "scheduler": {
            "running": True,
            "interval_seconds": 21600,
            "overdue": False,
            "next_run_at": (
                datetime.fromisoformat(slot) + timedelta(hours=6)
            ).isoformat(),
            "last_run": {"slot": slot, "ran_at": ran_at},
        },
    }
    assert slot.endswith(
        ("T00:00:00+00:00", "T06:00:00+00:00", "T12:00:00+00:00", "T18:00:00+00:00")
    )


@pytest.mark.parametrize(
    "job_runs",
    ["CREATE TABLE job_runs (x)", "CREATE TABLE job_runs (slot, ran_at, pid)"],
)
def test_a_job_runs_table_not_ours_never_stops_the_metrics(db_path, job_runs, caplog):
    with sqlite3.connect(db_path) as db:
        db.execute(job_runs)
        if "slot" in job_runs:
            db.execute("INSERT INTO job_runs VALUES ('not a slot', 'never', 0)")
    with TestClient(main.create_app(main.Settings(db_path=str(db_path)))) as client:
        assert client.get("/metrics?group_by=platform").status_code == 200
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize(
    "last_slot_age, seconds_into_slot, overdue",
    [
        (0, 30, False),
        (0, 3600, False),
        (None, 30, False),
        (None, 61, True),
        (1, 61, True),
    ],
)
def test_health_says_overdue_when_the_latest_slot_has_no_run_after_a_minute(
    last_slot_age, seconds_into_slot, overdue, monkeypatch
):
    heartbeat = main.Heartbeat("unused.db", 21600)
    now = 1_800_000_000 // 21600 * 21600 + seconds_into_slot
    monkeypatch.setattr(main.time, "time", lambda: now)
    slot = datetime.fromtimestamp(
        now // 21600 * 21600 - 21600 * (last_slot_age or 0), UTC
    )
    last_run = (
        None if last_slot_age is None else {"slot": slot.isoformat(), "ran_at": "…"}
    )
    assert heartbeat.state(last_run)["overdue"] is overdue


# OpenAPI ---------------------------------------------------------------------------------


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
        "format",
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
    assert params["format"]["schema"]["enum"] == ["json", "csv"]
    assert {"200", "304", "422", "503"} <= set(operation["responses"])
    content = operation["responses"]["200"]["content"]
    assert content["application/json"]["schema"]["$ref"].endswith("/MetricsPage")
    assert "text/csv" in content
    assert "304" in spec["paths"]["/dimensions"]["get"]["responses"]


# The file under the service: changed, replaced, removed, locked ------------------------


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_seed_force_over_the_served_file_never_damages_it(tmp_path, journal_mode):
    path = tmp_path / "ads.db"
    seed.seed(path, days=5, density=0.05)
    sqlite3.connect(path).execute(
        f"PRAGMA journal_mode = {journal_mode}"
    ).connection.close()
    settings = main.Settings(db_path=str(path), heartbeat_interval=1)
    with TestClient(main.create_app(settings)) as client:
        wait_until(lambda: len(job_runs(path)) >= 2)  # heartbeats are writing to it
        seed.seed(path, days=9, density=0.05, force=True)
        reseeded = time.monotonic()
        wait_until(
            lambda: client.get("/dimensions").json()["date"]["last"] == "2025-01-09"
        )
        assert time.monotonic() - reseeded < 2
        wait_until(lambda: len(job_runs(path)) >= 2)  # and go on writing
        assert client.get("/metrics?group_by=date").json()["paging"]["total_rows"] == 9
    assert integrity(path) == "ok"
    with TestClient(main.create_app(settings)) as client:  # a restart works
        assert client.get("/metrics?group_by=date").json()["paging"]["total_rows"] == 9
    assert integrity(path) == "ok"
    assert (
        sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        == journal_mode
    )


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_seed_force_killed_while_copying_leaves_the_old_data_whole(
    tmp_path, journal_mode
):
    target = tmp_path / "ads.db"
    seed.seed(target, days=3)
    sqlite3.connect(target).execute(
        f"PRAGMA journal_mode = {journal_mode}"
    ).connection.close()
    before = dump(target)
    journal = Path(f"{target}-{'wal' if journal_mode == 'wal' else 'journal'}")
    process = subprocess.Popen(
        [
            sys.executable,
            "seed.py",
            "--db",
            str(target),
            "--days",
            "200",
            "--density",
            "0.45",
            "--force",
        ],
        cwd=HERE,
    )
    # The copy into the target is under way once it has a journal with pages in it.
    wait_until(
        lambda: journal.exists() and journal.stat().st_size > 8192,
        timeout=60,
        step=0.001,
    )
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert dump(target) == before and integrity(target) == "ok"


@pytest.mark.parametrize("previous", [False, True])
def test_a_seed_killed_while_building_leaves_the_previous_database_or_nothing(
    tmp_path, previous
):
    target = tmp_path / "ads.db"
    if previous:
        seed.seed(target, days=3)
        before = dump(target)
    process = subprocess.Popen(
        [
            sys.executable,
            "seed.py",
            "--db",
            str(target),
            "--days",
            "365",
            "--density",
            "0.45",
            "--force",
        ],
        cwd=HERE,
    )
    wait_until(lambda: list(tmp_path.glob(".ads.db.*.tmp")))  # it is writing
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert (dump(target) == before) if previous else not target.exists()


def test_a_removed_file_is_a_503_naming_it_and_is_never_recreated(tmp_path):
    path = build_db(tmp_path / "ads.db")
    settings = main.Settings(db_path=str(path), heartbeat_interval=1)
    with TestClient(main.create_app(settings)) as client:
        wait_until(lambda: job_runs(path))
        path.unlink()
        wait_until(lambda: status_of(client) == (503, 503))
        assert client.get("/metrics").json() == {
            "detail": f"database {path} is missing"
        }
        assert client.get("/health").json()["reason"] == f"database {path} is missing"
        time.sleep(2.5)  # two heartbeat slots pass
        assert not path.exists()
        build_db(path)  # put back: served again, and the heartbeat resumes
        wait_until(lambda: status_of(client) == (200, 200))
        check_page(client.get("/metrics?group_by=week"), {"group_by": "week"})
        wait_until(lambda: job_runs(path), timeout=3)


@pytest.mark.parametrize("how", ["renamed over it", "removed, then copied back"])
def test_a_wal_file_replaced_while_none_reads_is_served_and_left_whole(tmp_path, how):
    path, new = tmp_path / "ads.db", tmp_path / "new.db"
    for db, days in ((path, 3), (new, 6)):
        seed.seed(db, days=days, density=0.05)
        sqlite3.connect(db).execute("PRAGMA journal_mode = wal").connection.close()
    pristine = dump(new)
    settings = main.Settings(db_path=str(path), heartbeat_interval=1)
    with TestClient(main.create_app(settings)) as client:
        wait_until(lambda: len(job_runs(path)) >= 2)  # the heartbeat wrote to the WAL
        if how == "renamed over it":
            os.replace(new, path)
        else:
            path.unlink()
            wait_until(lambda: status_of(client) == (503, 503))
            shutil.copy(new, path)
        dates = lambda: client.get("/dimensions").json().get("date", {}).get("last")
        wait_until(lambda: dates() == "2025-01-06", timeout=5)
        wait_until(lambda: len(job_runs(path)) >= 2)  # the heartbeat writes to it
        assert client.get("/metrics?group_by=date").json()["paging"]["total_rows"] == 6
    assert integrity(path) == "ok"  # which reads, and checkpoints, what the WAL holds
    assert dump(path) == pristine


def test_a_csv_asked_for_as_the_file_goes_is_a_503(tmp_path):
    path = build_db(tmp_path / "ads.db")
    with TestClient(main.create_app(main.Settings(db_path=str(path)))) as client:
        path.unlink()  # asked for before the service looks at the path again
        answer = client.get("/metrics?format=csv")
        assert answer.status_code == 503 and str(path) in answer.json()["detail"]


def test_a_file_corrupted_in_place_is_a_503_until_it_is_mended(client, db_path):
    good = db_path.read_bytes()
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


def test_rows_dates_and_names_written_in_place_are_served_within_a_second(
    served, db_path
):
    client = served
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO dim_region VALUES (11, 'Arctic')")
        db.execute("INSERT INTO dim_date VALUES (300, '2025-02-16')")
        db.execute(
            "INSERT INTO fact_ad_metrics_daily VALUES (300, 11, 4, 2, 9, 1, 8, 500, 5, 1.25, 1, 2)"
        )
    written = time.monotonic()
    response = wait_until(
        lambda: (r := client.get("/metrics?region=arctic")).status_code == 200 and r
    )
    assert time.monotonic() - written < 1.0
    assert response.json()["data"][0]["date"] == "2025-02-16"
    assert response.json()["totals"]["impressions"] == 500
    assert client.get("/dimensions").json()["region"][-1] == "Arctic"


def test_a_file_replaced_under_load_is_followed_with_no_500_and_few_503s(tmp_path):
    path = build_db(tmp_path / "ads.db")
    copies = [
        build_db(tmp_path / f"copy{i}.db", v)
        for i, v in enumerate(["plain", "no unique key"])
    ]
    server, url = serve(path, tmp_path / "server.log")
    try:
        statuses, errors, done = [], [], threading.Event()

        def ask():
            with httpx.Client(base_url=url, timeout=30) as http:
                while not done.is_set():
                    try:
                        statuses.append(
                            http.get(
                                "/metrics?group_by=week,region&limit=5"
                            ).status_code
                        )
                    except httpx.HTTPError as e:
                        errors.append(e)

        clients = [threading.Thread(target=ask) for _ in range(12)]
        for thread in clients:
            thread.start()
        until = time.monotonic() + 6
        for i in range(10**6):
            if time.monotonic() > until:
                break
            shutil.copy(copies[i % 2], tmp_path / "next.db")
            os.replace(tmp_path / "next.db", path)
            time.sleep(0.3)
        done.set()
        for thread in clients:
            thread.join()
        assert not errors and statuses
        assert 500 not in statuses and statuses.count(503) <= len(statuses) * 0.05
        time.sleep(1)
        assert {
            httpx.get(f"{url}/metrics?group_by=week").status_code for _ in range(20)
        } == {200}
    finally:
        stop(server)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM dim_region",
        "UPDATE fact_ad_metrics_daily SET cost = 0",
        "CREATE TABLE x (y)",
        "DROP TABLE dim_gender",
    ],
)
def test_query_connections_cannot_write(client, sql):
    async def write():
        database = client.app.state.database
        await database.fetch(database.snapshot(), sql, [])

    with pytest.raises(main.Unavailable, match="attempt to write a readonly database"):
        client.portal.call(write)


# Time limits: one request's limit never reaches another's query -------------------------


HEAVY = main.MetricsQuery(
    group_by=list(main.DIMENSIONS), sort=["-ctr"]
)  # every combination


async def answer(database: "main.Database", query: "main.MetricsQuery") -> tuple:
    """The service's one row for a JSON answer: the page, the totals, the row count."""
    snapshot = database.snapshot()
    filters = main.resolve_filters(query, snapshot)
    _, _, sql, params = main.metrics_sql(query, filters, snapshot)
    [row] = await database.fetch(snapshot, sql, [*params, 100, 0])
    return row


def test_a_query_past_the_time_limit_is_stopped_and_the_connection_serves_the_next(
    big_db,
):
    light = main.MetricsQuery(
        start_date=date(2025, 1, 3), end_date=date(2025, 1, 3), region=["Oceania"]
    )

    async def alternate():
        database = main.Database(str(big_db), timeout=0.05, size=1)
        await database.check()
        for _ in range(
            20
        ):  # an interrupt meant for the heavy query never hits the light one
            with pytest.raises(main.Unavailable) as stopped:
                await answer(database, HEAVY)
            assert stopped.value.detail == (
                "the query took longer than 0.05 s and was stopped; "
                "narrow the date range, add filters or group by fewer fields"
            )
            assert (await answer(database, light))[2] > 0
        await database.close()

    asyncio.run(alternate())


def test_waiting_for_a_connection_counts_against_the_same_limit(big_db):
    async def timed(database):
        began = time.monotonic()
        with suppress(main.Unavailable):
            await answer(database, HEAVY)
        return time.monotonic() - began

    async def crowd():
        database = main.Database(str(big_db), timeout=0.5, size=2)
        await database.check()
        took = await asyncio.gather(*(timed(database) for _ in range(8)))
        await database.close()
        return took

    assert max(asyncio.run(crowd())) <= 0.5 + 0.25


def test_heavy_queries_wait_for_a_turn_and_light_ones_do_not(db_path):
    settings = main.Settings(db_path=str(db_path), query_timeout=0.3)
    with TestClient(main.create_app(settings)) as client:
        turns = client.app.state.database.turns
        for _ in range(os.cpu_count() or 2):  # every heavy turn taken
            client.portal.call(turns.acquire)
        heavy = client.get("/metrics?group_by=platform")  # reads every row
        assert heavy.status_code == 503
        assert heavy.json() == {
            "detail": "every connection stayed busy for 0.3 s; retry later"
        }
        light = {"start_date": "2025-02-01", "end_date": "2025-02-01", "region": "Zulu"}
        check_page(client.get("/metrics", params=light), light)

        async def give_back():
            turns.release()

        client.portal.call(give_back)
        check_page(client.get("/metrics?group_by=platform"), {"group_by": "platform"})


def test_clients_that_leave_a_download_free_its_connection(big_db, tmp_path):
    server, url = serve(big_db, tmp_path / "server.log", QUERY_TIMEOUT_SECONDS="2")
    try:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(12):  # more than the 8 connections, each left mid-download
            start_download(port).close()
        # Each heavy request needs a turn and a connection those downloads held.
        statuses = [httpx.get(f"{url}/metrics?group_by=platform", timeout=10).status_code
                    for _ in range(3)]  # fmt: skip
        assert statuses == [200, 200, 200]
    finally:
        stop(server)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_downloads_at_once_are_bounded_and_the_next_told_to_retry(big_db, tmp_path):
    server, url = serve(big_db, tmp_path / "server.log")
    stalled = []
    try:
        port = int(url.rsplit(":", 1)[1])
        stalled += [start_download(port) for _ in range(8)]  # 10 MB each, unread
        one_more = httpx.get(f"{url}/metrics?format=csv")
        assert one_more.status_code == 503
        assert one_more.json()["detail"] == "8 downloads are under way; retry later"
        assert httpx.get(f"{url}/metrics?limit=1").status_code == 200
        stalled.pop().close()
        wait_until(
            lambda: httpx.get(f"{url}/metrics?format=csv&limit=1").status_code == 200
        )
    finally:
        for download in stalled:
            download.close()
        stop(server)


def test_a_replaced_file_s_connections_close_once_its_last_request_gives_up(tmp_path):
    path = build_db(tmp_path / "ads.db")

    async def scenario():
        database = main.Database(str(path), timeout=0.3, size=1)
        await database.check()
        old = database.snapshot()
        for _ in range(os.cpu_count() or 2):  # every turn taken: a heavy request waits
            await database.turns.acquire()
        waiting = asyncio.ensure_future(database.fetch(old, "SELECT 1", [], heavy=True))
        await asyncio.sleep(0.05)
        os.replace(build_db(tmp_path / "new.db"), path)
        await database.check()  # a new pool; the old one is retired, a request waits
        assert database.snapshot().pool is not old.pool and old.pool.idle.qsize() == 1
        with pytest.raises(main.Unavailable):
            await waiting
        assert old.pool.idle.qsize() == 0  # closed as its last request gave up
        await database.close()

    asyncio.run(scenario())


def test_a_close_cancelled_midway_still_closes_the_connections(db_path):
    async def cancel_a_close():
        database = main.Database(str(db_path), 10)
        await database.check()
        database.watching = asyncio.create_task(database.watch())
        closing = asyncio.create_task(database.close())
        await asyncio.sleep(0)  # close() now waits for the watcher to end
        closing.cancel()
        with suppress(asyncio.CancelledError):
            await closing
        pool = database.current.pool
        return pool.retired, pool.watcher, pool.idle.qsize()

    # Each open connection keeps a thread that would keep this process from exiting.
    assert asyncio.run(cancel_a_close()) == (True, None, 0)


# The heartbeat -------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [7, 21600])
def test_heartbeat_slots_fall_on_the_epoch_grid_across_restarts(db_path, interval):
    for _ in range(2):  # a start, then a restart
        settings = main.Settings(db_path=str(db_path), heartbeat_interval=interval)
        with TestClient(main.create_app(settings)) as client:
            scheduler = client.app.state.heartbeat.scheduler
            wait_until(
                lambda s=scheduler: (
                    s.get_job("heartbeat").next_run_time.timestamp() > time.time()
                )
            )
            next_run = scheduler.get_job("heartbeat").next_run_time.timestamp()
            assert next_run % interval == 0 and 0 < next_run - time.time() <= interval
            health = client.get("/health").json()["scheduler"]
            assert datetime.fromisoformat(health["next_run_at"]).timestamp() == next_run
    slots = [
        datetime.fromisoformat(slot).timestamp() for slot, _, _ in job_runs(db_path)
    ]
    assert slots and all(s % interval == 0 for s in slots)
    if interval == 21600:
        assert datetime.fromtimestamp(next_run, UTC).hour in (0, 6, 12, 18)


def test_two_instances_on_one_file_record_each_slot_once(db_path, caplog):
    async def race():
        beats = [main.Heartbeat(str(db_path), 3600), main.Heartbeat(str(db_path), 3600)]
        await asyncio.gather(*(beat.run() for beat in beats))

    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        for _ in range(10):
            sqlite3.connect(db_path, isolation_level=None).execute(
                "DROP TABLE IF EXISTS job_runs"
            ).connection.close()
            caplog.clear()
            asyncio.run(race())
            assert len(job_runs(db_path)) == 1
            assert len(heartbeats(caplog)) == 1
            assert not [
                r for r in caplog.records if r.levelno >= logging.WARNING
            ]  # losing is normal


def test_the_latest_slot_runs_at_start_if_missing_and_not_again(db_path, caplog):
    settings = main.Settings(db_path=str(db_path))
    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        with TestClient(main.create_app(settings)):
            [(slot, ran_at, pid)] = wait_until(lambda: job_runs(db_path))
        assert slot == slot_at(datetime.fromisoformat(ran_at).timestamp(), 21600)
        assert pid == os.getpid()
        assert heartbeats(caplog) == [f"heartbeat slot={slot} ran_at={ran_at}"]
        caplog.clear()
        with TestClient(main.create_app(settings)) as client:
            wait_until(
                lambda: (
                    client.get("/health").json()["scheduler"]["next_run_at"]
                    > datetime.now(UTC).isoformat()
                )
            )
        assert job_runs(db_path) == [(slot, ran_at, pid)]
        assert heartbeats(caplog) == []


def test_a_claim_waiting_for_the_write_lock_blocks_no_request(db_path):
    settings = main.Settings(db_path=str(db_path), heartbeat_interval=2)
    with TestClient(main.create_app(settings)) as client:
        wait_until(lambda: job_runs(db_path))
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # the write lock: the next claim has to wait
        due = (time.time() // 2 + 1) * 2
        answered = 0
        while time.time() < due + 0.8:  # the run for `due` has started, and waits
            for url in ("/metrics?group_by=platform&sort=-cost", "/health"):
                assert client.get(url).status_code == 200
                answered += 1
        assert slot_at(due, 2) not in [slot for slot, _, _ in job_runs(db_path)]
        released = time.time()
        locker.execute("COMMIT")
        ran_at = wait_until(
            lambda: {s: r for s, r, _ in job_runs(db_path)}.get(slot_at(due, 2))
        )
    assert answered > 10  # answered all along while the claim waited
    # It started on time, and was recorded once the lock was released.
    assert due <= datetime.fromisoformat(ran_at).timestamp() < released


def test_a_claim_waits_through_busy_recovery(db_path, caplog, monkeypatch):
    attempts, connect = [], main.aiosqlite.connect

    def recovering(*args, **kwargs):
        attempts.append(args)
        if len(attempts) < 3:  # another process is recovering the WAL after a crash
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorcode = 261  # SQLITE_BUSY_RECOVERY
            raise error
        return connect(*args, **kwargs)

    monkeypatch.setattr(main.aiosqlite, "connect", recovering)
    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        asyncio.run(main.Heartbeat(str(db_path), 3600).run())
    assert len(attempts) == 3 and len(job_runs(db_path)) == 1
    assert len(heartbeats(caplog)) == 1 and "failed" not in caplog.text


def test_a_claim_that_wins_is_logged_even_if_the_wal_is_not_emptied(
    db_path, caplog, monkeypatch
):
    execute = main.aiosqlite.Connection.execute

    async def failing_checkpoint(self, sql, *args):
        if sql.startswith("PRAGMA wal_checkpoint"):
            raise sqlite3.DatabaseError("database disk image is malformed")
        return await execute(self, sql, *args)

    monkeypatch.setattr(main.aiosqlite.Connection, "execute", failing_checkpoint)
    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        asyncio.run(main.Heartbeat(str(db_path), 3600).run())
    assert len(job_runs(db_path)) == 1 and len(heartbeats(caplog)) == 1
    assert "the WAL was not emptied after slot " in caplog.text
    assert ": database disk image is malformed" in caplog.text
    assert "failed" not in caplog.text


def test_a_failing_run_is_logged_with_its_traceback_and_the_next_slot_runs(
    db_path, caplog
):
    settings = main.Settings(db_path=str(db_path), heartbeat_interval=1)
    with (
        caplog.at_level(logging.INFO, logger="ad_metrics"),
        TestClient(main.create_app(settings)) as client,
    ):
        wait_until(lambda: job_runs(db_path))
        db = sqlite3.connect(db_path, isolation_level=None)
        db.execute(
            "CREATE TRIGGER no_heartbeat BEFORE INSERT ON job_runs "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
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


def test_two_workers_record_each_slot_once_and_log_it_once(tmp_path):
    db = build_db(tmp_path / "ads.db")
    server, _ = serve(
        db, tmp_path / "server.log", "--workers", "2", HEARTBEAT_INTERVAL_SECONDS="1"
    )
    time.sleep(5)  # about 4 s of slots, after both workers have started
    stop(server)
    runs = job_runs(db)
    stamps = [datetime.fromisoformat(slot).timestamp() for slot, _, _ in runs]
    assert len(stamps) >= 3
    assert [b - a for a, b in pairwise(stamps)] == [1] * (
        len(stamps) - 1
    )  # none missing, none twice
    logged = [
        line.split("slot=")[1].split()[0]
        for line in (tmp_path / "server.log").read_text().splitlines()
        if "heartbeat slot=" in line and " ran_at=" in line
    ]
    assert sorted(logged) == [slot for slot, _, _ in runs]


def test_sigterm_while_a_claim_waits_stops_cleanly_and_the_log_tells_the_truth(
    tmp_path,
):
    db = build_db(tmp_path / "ads.db")
    server, url = serve(db, tmp_path / "server.log", HEARTBEAT_INTERVAL_SECONDS="4")
    wait_until(
        lambda: job_runs(db) if server.poll() is None else pytest.fail("server died")
    )
    done, answered = threading.Event(), []

    def load():
        with httpx.Client(base_url=url) as http:
            while not done.is_set():
                with suppress(httpx.HTTPError):  # the server is going away
                    answered.append(
                        http.get("/metrics?group_by=week,region&sort=-cpm").status_code
                    )

    clients = [threading.Thread(target=load) for _ in range(4)]
    for thread in clients:
        thread.start()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the next run's claim waits for this lock...
    time.sleep((time.time() // 4 + 1) * 4 - time.time() + 0.3)  # ...and is waiting now
    status = stop(server)
    done.set()
    for thread in clients:
        thread.join()
    locker.execute("ROLLBACK")
    log = (tmp_path / "server.log").read_text()
    assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in log
    [waiting] = [line for line in log.splitlines() if "not recorded" in line]
    assert waiting.endswith("not recorded: the server is stopping")
    assert waiting.split("slot=")[1].split()[0] not in [
        slot for slot, _, _ in job_runs(db)
    ]
    for bad in ("Traceback", "ResourceWarning", "Task was destroyed", "ERROR"):
        assert bad not in log
    assert answered and set(answered) == {200}


def test_a_run_that_wins_logs_its_row_and_only_that(tmp_path):
    """Stopped at any moment, the log and job_runs agree: a slot logged as recorded has
    its row, one logged as not recorded has none."""
    db = build_db(tmp_path / "ads.db")
    for trial in range(2):
        log_path = tmp_path / f"server{trial}.log"
        server, _ = serve(db, log_path, HEARTBEAT_INTERVAL_SECONDS="1")
        wait_until(lambda p=log_path: "heartbeat slot=" in p.read_text())
        time.sleep(1 + random.random())
        stop(server)
        lines = [
            line
            for line in log_path.read_text().splitlines()
            if "heartbeat slot=" in line
        ]
        recorded = {slot for slot, _, _ in job_runs(db)}
        for line in lines:
            slot = line.split("slot=")[1].split()[0]
            assert (slot in recorded) == (" ran_at=" in line), line


# Start-up, and python main.py ----------------------------------------------------------


@pytest.mark.parametrize(
    "content, line",
    [
        (None, "{p} not found; create it with: python seed.py --db {p}"),
        (b"not a database at all" * 100, "{p} cannot be read: file is not a database"),
        (b"", "{p} cannot be read: no such table: fact_ad_metrics_daily"),
    ],
    ids=["missing", "not a database", "an empty file"],
)
def test_uvicorn_with_an_unusable_database_stops_with_one_line(tmp_path, content, line):
    path = tmp_path / "ads.db"
    if content is not None:
        path.write_bytes(content)
    result = run("-m", "uvicorn", "main:app", "--port", "0", env={"ADS_DB": str(path)})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    errors = [
        e
        for e in result.stderr.splitlines()
        if e.startswith("ERROR") and "startup failed" not in e
    ]
    assert errors == [f"ERROR:    database {line.format(p=path)}"]
    assert path.exists() == (content is not None)  # never created


def test_an_old_sqlite_stops_start_up_with_one_line(db_path, monkeypatch):
    monkeypatch.setattr(main.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(main.sqlite3, "sqlite_version", "3.31.1")
    app = main.create_app(main.Settings(db_path=str(db_path)))
    with (
        pytest.raises(
            main.StartupError, match=r"^SQLite 3.35 or newer is needed, not 3.31.1$"
        ),
        TestClient(app),
    ):
        pass


def test_python_main_py_seeds_a_missing_database_then_serves(tmp_path):
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
        assert "Native, Banner & Interstitial" in dims["placement"]
    finally:
        server.send_signal(signal.SIGTERM)
        log, _ = server.communicate(timeout=10)
    assert "new.db not found: seeding it" in log
    assert "seeded " in log and " rows over 365 days in " in log


def test_sigterm_ends_a_stalled_download_within_the_query_time_limit(big_db, tmp_path):
    port = free_port()
    env = {"ADS_DB": str(big_db), "PORT": str(port), "QUERY_TIMEOUT_SECONDS": "1"}
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "main.py"],
        cwd=HERE,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: probe(f"http://127.0.0.1:{port}/health"), timeout=30)
        stalled = start_download(port)  # and reads no more
        time.sleep(0.5)
        asked = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) in (0, -signal.SIGTERM)
        assert time.monotonic() - asked < 3
    finally:
        server.kill()
    stalled.close()
    assert "Application shutdown complete" in log.read_text()


# seed.py ----------------------------------------------------------------------------------


def test_seed_is_deterministic_and_realistic(tmp_path):
    a = seed.seed(tmp_path / "a.db", days=10, seed=3)
    b = seed.seed(tmp_path / "b.db", days=10, seed=3)
    seed.seed(tmp_path / "c.db", days=10, seed=4)
    everything = "SELECT * FROM fact_ad_metrics_daily ORDER BY 1, 2, 3, 4, 5, 6, 7"
    rows = {
        n: sqlite3.connect(tmp_path / f"{n}.db").execute(everything).fetchall()
        for n in "abc"
    }
    assert a == b == len(rows["a"]) and rows["a"] == rows["b"] != rows["c"]
    db = sqlite3.connect(tmp_path / "a.db")
    wrong_places = db.execute(
        "SELECT count(*) FROM fact_ad_metrics_daily JOIN dim_platform USING (platform_id) "
        "JOIN dim_placement USING (placement_id) JOIN dim_device_type USING (device_type_id) "
        "WHERE (placement_name IN ('Stories', 'Reels', 'Explore') AND device_type_name = 'Desktop') "
        "OR (platform_name = 'Audience Network' AND placement_name NOT IN "
        "('Native, Banner & Interstitial', 'Rewarded Video')) "
        "OR (placement_name = 'Right Column' AND device_type_name != 'Desktop')"
    ).fetchone()[0]
    assert wrong_places == 0
    assert (
        db.execute(
            "SELECT count(*) FROM fact_ad_metrics_daily WHERE conversions > clicks "
            "OR likes > impressions OR cost < 0"
        ).fetchone()[0]
        == 0
    )
    assert [
        r[0] for r in db.execute("SELECT age_range FROM dim_age_group ORDER BY age_id")
    ] == ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"]


def test_seed_cli_defaults_size_and_refusals(tmp_path):
    result = run("seed.py", "--db", str(tmp_path / "ads.db"))
    assert result.returncode == 0, result.stderr
    [[rows]] = sqlite3.connect(tmp_path / "ads.db").execute(
        "SELECT count(*) FROM fact_ad_metrics_daily"
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


def test_seed_clears_the_journal_a_removed_database_left_behind(tmp_path):
    old, new, fresh = tmp_path / "old.db", tmp_path / "ads.db", tmp_path / "fresh.db"
    seed.seed(old, days=4, seed=5)
    db = sqlite3.connect(old)  # a WAL with frames in it, left where ads.db will be
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute("UPDATE fact_ad_metrics_daily SET cost = cost + 1")
    db.commit()
    shutil.copy(f"{old}-wal", f"{new}-wal")
    db.close()
    seed.seed(new, days=2)
    seed.seed(fresh, days=2)
    assert integrity(new) == "ok" and dump(new) == dump(fresh)


# The reference: the contract, read independently, over the fixture's rows ---------------

HERE = Path(__file__).parent
ORPHAN, ORPHAN_DATE = 99, 999  # ids that are in no dimension table
DIMS = {
    "region": ("dim_region", "region_id", "region_name", {7: "Mike", 2: "Zulu", 5: "Alpha", 9: "Quebec"}),
    "age_group": ("dim_age_group", "age_id", "age_range", {4: "18-24", 1: "35-44"}),
    "gender": ("dim_gender", "gender_id", "gender_name", {2: "female", 1: "Male"}),
    "platform": ("dim_platform", "platform_id", "platform_name", {9: "Facebook", 3: "Instagram"}),
    "placement": ("dim_placement", "placement_id", "placement_name",
                  {1: "Stories", 2: "Feed", 6: "Reels", 4: 'Native, Banner & "Interstitial"'}),
    "device_type": ("dim_device_type", "device_type_id", "device_type_name", {8: "Mobile", 6: "Tablet"}),
}  # fmt: skip
DAYS = [(date(2025, 1, 27) + timedelta(days=i)).isoformat() for i in range(20)]
SHUFFLED_IDS = dict(zip(DAYS, random.Random(1).sample(range(100, 200), len(DAYS))))
IN_ORDER_IDS = dict(zip(DAYS, range(1, 21)))
GRAIN = ["date", *DIMS]
BASE = ["impressions", "clicks", "cost", "conversions", "likes"]


def make_facts() -> list[dict]:
    """The fixture's rows: ids, a day, metrics (cost in whole cents); a few rows per
    dimension carry an id that is in no table (the day's too)."""
    rng = random.Random(42)
    ids = {
        dim: [i for i, name in DIMS[dim][3].items() if name != "Quebec"] for dim in DIMS
    }
    facts = []
    for day, combo in product(DAYS, product(*ids.values())):
        if rng.random() > 0.3:
            continue
        facts.append(dict(zip(DIMS, combo), day=day, date_id=SHUFFLED_IDS[day]))
    for i, orphan in enumerate([*DIMS, "day"] * 3):  # rows with unknown ids
        row = dict(facts[i * 37])
        row.update(
            {orphan: ORPHAN}
            if orphan in DIMS
            else {"day": None, "date_id": ORPHAN_DATE + i % 2}
        )
        facts.append(row)
    for row in facts:
        imps = rng.choice([0, rng.randint(1, 40), rng.randint(100, 20000)])
        if row["day"] == "2025-02-03" and row["region"] == 7:  # a group with nothing
            imps = 0
        clicks = rng.randint(0, imps // 15) if imps else 0
        row |= {
            "impressions": imps,
            "clicks": clicks,
            "likes": rng.randint(0, imps // 50),
            "conversions": rng.randint(0, clicks // 4) if clicks else 0,
            "cost": rng.randint(1, 2 * imps) if imps else 0,
        }
    for row in facts[::29]:  # refunds: a negative cost
        row["cost"] = -row["cost"]
    return facts


FACTS = make_facts()


def build_db(path: Path, variant: str = "plain") -> Path:
    """Write the fixture database, as someone else's file might be: plain tables, in
    one of the variants that a valid file may take."""
    db = sqlite3.connect(path)
    date_ids = IN_ORDER_IDS if variant == "date ids in date order" else SHUFFLED_IDS
    twice = variant == "dimension rows loaded twice"
    key = "" if twice else " PRIMARY KEY"
    count = "REAL" if variant == "counts stored as reals" else "INTEGER"
    odd = variant == "extra columns named like ours"  # a fiscal calendar, say
    extra = ", month TEXT DEFAULT 'P01', week INTEGER DEFAULT 1, cost REAL DEFAULT 1e9"
    db.execute(
        f"CREATE TABLE dim_date (date_id INTEGER{key}, date_value TEXT{extra * odd})"
    )
    dates = [(i, d) for d, i in date_ids.items()]
    db.executemany(
        "INSERT INTO dim_date (date_id, date_value) VALUES (?, ?)", dates * (1 + twice)
    )
    for table, id_col, name_col, names in DIMS.values():
        extra = ", cost REAL DEFAULT 5, impressions INTEGER DEFAULT 3, date_id INTEGER"
        db.execute(
            f"CREATE TABLE {table} ({id_col} INTEGER{key}, {name_col} TEXT{extra * odd})"
        )
        rows = list(names.items()) * (1 + twice)
        db.executemany(
            f"INSERT INTO {table} ({id_col}, {name_col}) VALUES (?, ?)", rows
        )
    ids = ", ".join(d[1] for d in DIMS.values())
    unique = "" if variant == "no unique key" else f", PRIMARY KEY (date_id, {ids})"
    db.execute(f"CREATE TABLE fact_ad_metrics_daily (date_id INTEGER, {ids}, impressions {count}, "
               f"clicks {count}, cost REAL, conversions {count}, likes {count}{unique})")  # fmt: skip
    db.executemany(
        "INSERT INTO fact_ad_metrics_daily VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [(date_ids.get(f["day"], f["date_id"]), *(f[d] for d in DIMS), f["impressions"],
          f["clicks"], f["cost"] / 100, f["conversions"], f["likes"]) for f in FACTS],
    )  # fmt: skip
    db.commit()
    db.close()
    return path


def values(params: dict, name: str) -> list[str]:
    """A parameter's values: repeated, or separated with commas; a known name whole."""
    raw = params.get(name, [])
    known = {n.casefold() for n in DIMS[name][3].values()} if name in DIMS else set()
    out = []
    for item in [raw] if isinstance(raw, str) else raw:
        out += (
            [item.strip()]
            if item.strip().casefold() in known
            else [v.strip() for v in item.split(",")]
        )
    return out


def label(fact: dict, field: str) -> str | None:
    if field in DIMS:
        return DIMS[field][3].get(fact[field])
    if fact["day"] is None:
        return None
    day = date.fromisoformat(fact["day"])
    monday = (day - timedelta(days=day.weekday())).isoformat()
    return {"date": fact["day"], "week": monday, "month": fact["day"][:7]}[field]


def rounded(numerator, denominator) -> float | None:
    """numerator/denominator to 6 decimals, exactly, a half away from zero; None for
    x/0."""
    if denominator == 0:
        return None
    millionths = Fraction(numerator) / denominator * 10**6
    magnitude = math.floor(abs(millionths) + Fraction(1, 2))
    return float(Fraction(magnitude if millionths >= 0 else -magnitude, 10**6))


def metrics(s: dict) -> dict:
    cost = Fraction(s["cost"], 100)
    return {
        "impressions": s["impressions"],
        "clicks": s["clicks"],
        "cost": float(cost),
        "conversions": s["conversions"],
        "likes": s["likes"],
        "ctr": rounded(s["clicks"], s["impressions"]),
        "cpc": rounded(cost, s["clicks"]),
        "cpm": rounded(1000 * cost, s["impressions"]),
        "cpa": rounded(cost, s["conversions"]),
        "conversion_rate": rounded(s["conversions"], s["clicks"]),
    }


def reference(params: dict, dates_in_order=False, **_) -> tuple[list[dict], dict]:
    """Answer a /metrics query as the contract says: all groups, in order, and totals."""

    wanted = {
        dim: {v.casefold() for v in values(params, dim)}
        for dim in DIMS
        if values(params, dim)
    }

    def matches(f):
        if ("start_date" in params or "end_date" in params) and f["day"] is None:
            return False  # a day missing from dim_date is in no range
        in_range = (
            params.get("start_date", "0")
            <= (f["day"] or "0")
            <= params.get("end_date", "9")
        )
        return in_range and all(
            (label(f, d) or "\0").casefold() in names for d, names in wanted.items()
        )

    rows = [f for f in FACTS if matches(f)]
    fields = values(params, "group_by") or GRAIN
    # Dimensions and dates group by id (so unknown ids stay apart), weeks and months by label.
    key = {
        f: (f if f in DIMS else "date_id") for f in fields if f not in ("week", "month")
    }
    groups: dict[tuple, dict] = {}
    for f in rows:
        group = groups.setdefault(
            tuple(f[key[x]] if x in key else label(f, x) for x in fields),
            {"f": f, **dict.fromkeys(BASE, 0)},
        )
        for m in BASE:
            group[m] += f[m]
    out = [
        {**{x: label(g["f"], x) for x in fields}, **metrics(g), "_f": g["f"]}
        for g in groups.values()
    ]
    sort = values(params, "sort")
    for item in reversed(
        sort + [f for f in fields if f not in {s.lstrip("-") for s in sort}]
    ):
        field, desc = item.lstrip("-"), item.startswith("-")
        out.sort(key=lambda r: order_key(r, field, desc, dates_in_order), reverse=desc)
    for r in out:
        del r["_f"]
    return out, metrics({m: sum(f[m] for f in rows) for m in BASE})


def order_key(row: dict, field: str, desc: bool, dates_in_order: bool):
    """Dimensions by id; dates by day (or by id, when ids follow days) then id; weeks
    and months by label, null first as SQL sorts it; metrics by value, null last."""
    value, fact = row[field], row["_f"]
    if field in DIMS:
        return fact[field]
    if field == "date" and dates_in_order:  # unknown dates' ids sort after the known
        return IN_ORDER_IDS.get(fact["day"], fact["date_id"])
    if field == "date":
        return (value is not None, value or "", fact["date_id"])
    if field in ("week", "month"):
        return (value is not None, value or "")
    return (value is not None, value or 0) if desc else (value is None, value or 0)


def check_page(response, params: dict, **fixture) -> dict:
    """Assert that a /metrics response is the reference's page for these parameters."""
    assert response.status_code == 200, response.text
    groups, totals = reference(params, **fixture)
    limit, offset = int(params.get("limit", 100)), int(params.get("offset", 0))
    body = response.json()
    assert body["data"] == groups[offset : offset + limit]
    assert body["totals"] == totals
    assert body["paging"]["total_rows"] == len(groups)
    assert (body["paging"]["limit"], body["paging"]["offset"]) == (limit, offset)
    assert (body["paging"]["next"] is None) == (offset + limit >= len(groups))
    for row in body["data"]:  # the grouped fields, in group_by order, then the metrics
        assert list(row) == (values(params, "group_by") or GRAIN) + main.METRICS
    main.MetricsPage.model_validate(body)
    return body


def walk(client, params: dict) -> list[dict]:
    """Every row of a result, following `next` from the first page."""
    seen, response = [], client.get("/metrics", params=params)
    while True:
        body = response.json()
        seen += body["data"]
        if body["paging"]["next"] is None:
            return seen
        response = client.get(body["paging"]["next"])


def from_csv(text: str, like):
    """A CSV field as the JSON value it stands for: empty for null, numbers as such."""
    if text == "":
        return None
    return type(like)(text) if isinstance(like, (int, float)) else text


# Generated queries ------------------------------------------------------------------------

ANY_TEXT = st.one_of(
    st.text(max_size=40),  # any code point: control characters, right-to-left marks...
    st.sampled_from(["", ",", ",,", "-", "--cost", "0000-01-01", "9" * 25, "%", "%ZZ", "%00",
                     "%FF%FE", "' OR 1=1 --", "x" * 10_000, "csv", "json"]),
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
        # Names joined with commas, unless one holds a comma: that one must come alone.
        **{dim: st.lists(st.sampled_from(list(names.values())).map(str.upper), min_size=1, max_size=2,
                         unique=True).map(lambda ns: ns if "," in "".join(ns) else ",".join(ns))
           for dim, (*_, names) in DIMS.items()},
        "group_by": st.tuples(st.sampled_from(["", "date,", "week,", "month,"]),
                              st.lists(st.sampled_from(list(DIMS)), min_size=1, max_size=3, unique=True))
                      .map(lambda t: t[0] + ",".join(t[1])),
        "sort": st.lists(st.sampled_from(main.METRICS), min_size=1, max_size=2, unique=True)
                  .map(lambda fields: ",".join("-" * (len(f) % 2) + f for f in fields)),
        "limit": st.integers(1, 1000).map(str),
        "offset": st.one_of(st.integers(0, 3000), st.just(2**63 - 1)).map(str),
    },
)  # fmt: skip
PARAMETERS = [
    "start_date",
    "end_date",
    *DIMS,
    "group_by",
    "sort",
    "limit",
    "offset",
    "format",
]
# sampled_from draws evenly, so repeats set the odds: mostly known names (so that an odd
# value meets its own validation), mostly nothing appended.
ODD = st.tuples(
    st.sampled_from([*PARAMETERS * 3, "", "Offset", "group-by", "limit "])
    | st.text(max_size=8),
    EDGES | ANY_TEXT,
)


# Helpers ------------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path) -> Path:
    return build_db(tmp_path / "ads.db")


@pytest.fixture
def client(db_path):
    """The service on the fixture database; afterwards, its data must be unchanged."""
    before = dump(db_path)
    with TestClient(main.create_app(main.Settings(db_path=str(db_path)))) as client:
        yield client
    assert (
        dump(db_path) == before
    )  # no request changed a table; only job_runs was added


@pytest.fixture
def served(db_path):
    """The service on the fixture database, which the test may change."""
    with TestClient(main.create_app(main.Settings(db_path=str(db_path)))) as client:
        yield client


@pytest.fixture(scope="session")
def big_db(tmp_path_factory) -> Path:
    """A seeded database of about 100,000 rows, for time limits and exports."""
    path = tmp_path_factory.mktemp("big") / "big.db"
    seed.seed(path, days=30, density=0.45)
    return path


def dump(path: Path) -> list[str]:
    """The database's schema and rows, but for the heartbeat's own table."""
    db = sqlite3.connect(path)
    try:
        return [line for line in db.iterdump() if "job_runs" not in line]
    finally:
        db.close()


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def status_of(client) -> tuple[int, int]:
    return client.get("/metrics?group_by=platform").status_code, client.get(
        "/health"
    ).status_code


def wait_until(condition, timeout: float = 10.0, step: float = 0.02):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)
    return result


def job_runs(path) -> list[tuple]:
    """The heartbeat's rows, in slot order; none if the table is not there yet."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT slot, ran_at, pid FROM job_runs ORDER BY slot"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def heartbeats(caplog) -> list[str]:
    """The heartbeat's INFO lines: one per run that recorded its slot."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.getMessage().startswith("heartbeat slot=")
    ]


def slot_at(timestamp: float, interval: int) -> str:
    return datetime.fromtimestamp(timestamp // interval * interval, UTC).isoformat()


def run(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db: Path, log: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """Start `uvicorn main:app` on `db` as a subprocess; return it and its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "default",
            "-m",
            "uvicorn",
            "main:app",
            "--port",
            str(port),
            *args,
        ],
        cwd=HERE,
        env={**os.environ, "ADS_DB": str(db), **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_until(
        lambda: probe(f"http://127.0.0.1:{port}/health") or process.poll() is not None,
        30,
    )
    return process, f"http://127.0.0.1:{port}"


def stop(server: subprocess.Popen) -> int:
    """SIGTERM the server; kill it if it has not stopped in 10 s."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(timeout=10)
    finally:
        server.kill()


def start_download(port: int) -> socket.socket:
    """Ask for every row as CSV over a raw socket; return it once the 200 has begun."""
    download = socket.create_connection(("127.0.0.1", port))
    download.sendall(b"GET /metrics?format=csv HTTP/1.1\r\nHost: x\r\n\r\n")
    assert download.recv(12) == b"HTTP/1.1 200"
    return download


def probe(url: str):
    """GET url; None if nothing answers yet."""
    try:
        return httpx.get(url)
    except httpx.TransportError:
        return None
