"""The Ad Metrics API's specification, as tests, in main.py's order.

Every /metrics answer is compared with `reference()` (near the end of the file): an
independent reading of the contract in plain Python over the rows the fixture database
is built from. The fixture has sparse ids out of name order, dates whose ids are
shuffled, a name holding a comma and quotes, refunds, and fact rows whose ids are
missing from their dimension tables.
"""

import asyncio
import csv
import hashlib
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
    env = {"ADS_DB": "/data/a.db", "HEARTBEAT_DB": "/run/hb.db", "HOST": "0.0.0.0",
           "PORT": "9000", "LOG_LEVEL": "debug", "HEARTBEAT_INTERVAL_SECONDS": "60",
           "QUERY_TIMEOUT_SECONDS": "2.5", "OTHER": "x", "db_path": "/not/a/variable"}  # fmt: skip
    assert main.Settings.from_env(env) == main.Settings(
        db_path="/data/a.db", heartbeat_db="/run/hb.db", host="0.0.0.0", port=9000,
        log_level="DEBUG", heartbeat_interval=60, query_timeout=2.5,
    )  # fmt: skip
    assert main.Settings.from_env({}) == main.Settings(
        db_path="ads.db", heartbeat_db="heartbeat.db", host="127.0.0.1", port=8000,
        log_level="INFO", heartbeat_interval=21600, query_timeout=10,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("PORT", "abc", "unable to parse string as an integer"),
        ("PORT", "70000", "less than or equal to 65535"),
        ("HEARTBEAT_INTERVAL_SECONDS", "0", "greater than or equal to 1"),
        ("HEARTBEAT_INTERVAL_SECONDS", "inf", "valid integer"),
        ("QUERY_TIMEOUT_SECONDS", "-1", "greater than 0"),
        ("QUERY_TIMEOUT_SECONDS", "nan", "less than or equal to 3600"),
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
    env = {"ADS_DB": str(db_path), "QUERY_TIMEOUT_SECONDS": "nan"}
    result = run("-m", "uvicorn", "main:app", "--port", "0", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "QUERY_TIMEOUT_SECONDS 'nan': Input should be less than or equal to 3600"
    )


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
    "a timestamp for a date": ("start_date=1735689600", "start_date", "date_parsing", "1735689600"),
    "empty date": ("end_date=", "end_date", "date_parsing", "end_date"),
    "limit 0": ("limit=0", "limit", "greater_than_equal", "'0'"),
    "limit 1001": ("limit=1001", "limit", "less_than_equal", "'1001'"),
    "limit 1e3": ("limit=1e3", "limit", "int_parsing", "'1e3'"),
    "limit 1.5": ("limit=1.5", "limit", "int_parsing", "'1.5'"),
    "empty limit": ("limit=", "limit", "int_parsing", "limit"),
    "offset -1": ("offset=-1", "offset", "greater_than_equal", "'-1'"),
    "offset past SQLite's integers": (f"offset={2**63}", "offset", "less_than_equal", str(2**63)),
    "group_by date and week": ("group_by=date,week", "group_by", "value_error", "'week'"),
    "group_by week and month": ("group_by=week&group_by=month", "group_by", "value_error", "'month'"),
    "unknown group_by": ("group_by=country", "group_by", "literal_error", "'country'"),
    "group_by in another case": ("group_by=Region", "group_by", "literal_error", "'Region'"),
    "group_by twice the same": ("group_by=region,region", "group_by", "value_error", "'region'"),
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
    "unknown format": ("format=xml", "format", "literal_error", "'xml'"),
    "a 10 KB value": ("placement=" + "x" * 10_000, "placement", "literal_error", "'" + "x" * 60 + "…'"),
    "control characters": ("device_type=%00%1b[2J", "device_type", "literal_error", "'\\x00\\x1b[2J'"),
    "unicode lookalike": ("platform=Ｆacebook", "platform", "literal_error", "'Ｆacebook'"),
}  # fmt: skip


@pytest.mark.parametrize("query, param, error_type, text", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("format", ["json", "csv"])
def test_bad_input_is_a_422_naming_the_parameter_and_value(
    client, query, param, error_type, text, format
):
    csv = format == "csv" and "format=" not in query
    response = client.get(f"/metrics?{query}" + "&format=csv" * csv)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", param] and error["type"] == error_type
    assert error["msg"].startswith(param) and text in error["msg"]


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
    "two bad filters, together": ("region=Atlantis&gender=none", [
        {"type": "literal_error", "loc": ["query", "region"], "input": ["Atlantis"],
         "msg": "region 'Atlantis' is not one of: Zulu, Alpha, Mike, Quebec"},
        {"type": "literal_error", "loc": ["query", "gender"], "input": ["none"],
         "msg": "gender 'none' is not one of: Male, female"}]),
    "a date that is not real": ("start_date=2025-02-30", [
        {"type": "date_parsing", "loc": ["query", "start_date"], "input": "2025-02-30",
         "msg": "start_date '2025-02-30' is no YYYY-MM-DD date"}]),
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
    "filters ignore case, take commas": {"region": "alpha, MIKE"},
    "filters repeat, and combine": {"region": ["Alpha", "Zulu"], "platform": "instagram"},
    "every filter at once": {"region": "Zulu", "age_group": "18-24", "gender": "FEMALE",
                             "platform": "Facebook", "placement": "Feed,Reels", "device_type": "Mobile"},
    "a name with a comma, whole": {"placement": 'native, banner & "interstitial"'},
    "a name with a comma, and another": {"placement": ['Native, Banner & "Interstitial"', "Feed"]},
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
    with TestClient(app_for(path)) as client:
        for params in [{}, {"limit": "30", "offset": "400", "sort": "-cost"},
                       {"group_by": "week"}, {"group_by": "month,region"},
                       {"group_by": "date", "sort": "-date"}, {"region": "Zulu"}]:  # fmt: skip
            response = client.get("/metrics", params=params)
            check_page(response, params, dates_in_order=variant.startswith("date ids"))


@pytest.mark.parametrize(
    "params",
    [{"limit": "97"}, {"group_by": "week,device_type", "sort": "-cost", "limit": "4"},
     {"group_by": "date,placement", "sort": "-ctr", "limit": "9", "region": "Zulu"}],
)  # fmt: skip
def test_following_next_walks_the_whole_result_once(client, params):
    assert_rows_equal(walk(client, params), reference(params)[0])


def test_next_keeps_the_query_string(client):
    response = client.get("/metrics?region=alpha,Zulu&group_by=date&limit=5&offset=5")
    assert response.json()["paging"]["next"] == (
        "/metrics?region=alpha,Zulu&group_by=date&limit=5&offset=10"
    )


def test_no_rows_gives_zero_totals_and_null_ratios(client):
    response = client.get("/metrics?region=quebec")
    assert response.status_code == 200
    assert response.json() == {
        "data": [],
        "totals": {"impressions": 0, "clicks": 0, "cost": 0.0, "conversions": 0,
                   "likes": 0, "ctr": None, "cpc": None, "cpm": None, "cpa": None,
                   "conversion_rate": None},
        "paging": {"limit": 100, "offset": 0, "total_rows": 0, "next": None},
    }  # fmt: skip


def test_zero_denominators_give_null_ratios(client):
    params = {"group_by": "date,region", "start_date": "2025-02-03",
              "end_date": "2025-02-03", "region": "Mike"}  # fmt: skip
    [row] = client.get("/metrics", params=params).json()["data"]
    assert row["impressions"] == row["clicks"] == row["conversions"] == 0
    assert [row[m] for m in main.RATIOS] == [None] * 5


def test_a_fact_row_with_an_unknown_id_is_kept_with_a_null_name(client):
    body = client.get("/metrics?group_by=region").json()
    assert [row["region"] for row in body["data"]] == ["Zulu", "Alpha", "Mike", None]
    orphans = sum(f["impressions"] for f in FACTS if f["region"] == ORPHAN)
    assert orphans and body["data"][-1]["impressions"] == orphans
    assert (
        client.get("/metrics?gender=FEMALE&group_by=gender").json()["data"][0]["gender"]
        == "female"
    )  # as the table spells it


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


def test_a_name_stands_for_each_of_its_ids_in_any_case_and_a_null_name_for_none(
    db_path,
):
    with sqlite3.connect(db_path) as db:  # two ids named alike; an id with no name
        db.execute("UPDATE dim_region SET region_name = 'mike' WHERE region_id = 2")
        db.execute("UPDATE dim_region SET region_name = NULL WHERE region_id = 5")
    with TestClient(app_for(db_path)) as client:
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
    with TestClient(app_for(path)) as client:
        assert len(client.get("/metrics?group_by=region").json()["data"]) == regions
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
        db.execute("UPDATE dim_age_group SET age_range = 0.1 + 0.2 WHERE age_id != ?",
                   [age_id])  # fmt: skip
        db.execute("DROP TABLE old_age")
        db.execute("UPDATE fact_ad_metrics_daily SET impressions = NULL, clicks = NULL, "
                   "cost = NULL, conversions = NULL, likes = NULL WHERE age_id = ?", [age_id])  # fmt: skip
    with TestClient(app_for(path)) as client:
        assert client.get("/dimensions").json()["age_group"] == ["0.3", "18"]
        rows = csv_rows(client.get("/metrics?age_group=18&format=csv"))
        assert rows and {(r["age_group"], r["impressions"], r["cost"], r["ctr"])
                         for r in rows} == {("18", "0", "0.0", "")}  # fmt: skip
        page = client.get("/metrics?age_group=18&group_by=age_group").json()
        assert page["data"] == [{"age_group": "18", **page["totals"]}]
        assert page["totals"]["impressions"] == 0 and page["totals"]["ctr"] is None
        by_age = client.get(
            "/metrics", params={"age_group": "0.3", "group_by": "age_group"}
        )
        assert [row["age_group"] for row in by_age.json()["data"]] == ["0.3"]


@pytest.mark.parametrize(
    "value, shown",
    [("'2025-13-01'", "'2025-13-01'"), ("20250101", "'20250101'"),
     ("CAST('2025-01-01' AS BLOB)", "b'2025-01-01'")],
)  # fmt: skip
def test_a_date_that_is_not_a_yyyy_mm_dd_text_stops_start_up(tmp_path, value, shown):
    path = build_db(tmp_path / "ads.db")
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE dim_date SET date_value = {value} WHERE date_id = ?",
                   [SHUFFLED_IDS[DAYS[0]]])  # fmt: skip
    with pytest.raises(main.StartupError) as stopped, TestClient(app_for(path)):
        pass
    assert str(stopped.value) == (
        f"database {path} cannot be read: dim_date holds {shown}, not a YYYY-MM-DD date"
    )


HYPOTHESIS = settings(
    deadline=None,
    derandomize=True,  # the same examples in every run: CI never meets a new one
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@settings(HYPOTHESIS, max_examples=200)
@given(params=st.deferred(lambda: VALID))
def test_any_valid_query_matches_the_reference(client, params):
    check_page(client.get("/metrics", params=params), params)


@settings(HYPOTHESIS, max_examples=50)
@given(params=st.deferred(lambda: VALID), data=st.data())
def test_totals_never_depend_on_grouping_order_or_page(client, params, data):
    """Orphan ids included: a filter's totals are its row in the unfiltered breakdown,
    and no group_by, sort, limit or offset changes the totals."""
    plain = {k: v for k, v in params.items() if k not in ("group_by", "sort", "limit", "offset")}  # fmt: skip

    def totals(**more):
        return client.get("/metrics", params={**plain, **more}).json()["totals"]

    expected = totals()
    assert totals(group_by="month", sort="-cost", limit="1", offset="2") == expected
    dim = data.draw(st.sampled_from(list(DIMS)))
    rows = client.get("/metrics", params={**plain, dim: [], "group_by": dim}).json()
    for row in rows["data"]:
        if row[dim] is not None:  # an unknown id has no name to filter by
            only = client.get("/metrics", params={**plain, dim: row[dim]}).json()
            assert only["totals"] == {m: row[m] for m in main.METRICS}


@settings(HYPOTHESIS, max_examples=300)
@given(
    method=st.sampled_from(["GET"] * 20 + ["POST", "PUT", "DELETE", "HEAD"]),
    path=st.sampled_from(["/metrics"] * 20 + ["/dimensions", "/health", "/nope"]),
    valid=st.deferred(lambda: VALID),
    odd=st.lists(st.deferred(lambda: ODD), max_size=2),
    raw=st.sampled_from([""] * 10 + ["&", "&&=", "&%", "&%zz=1", "&a=b=c", "&=x", "&limit"]),
)  # fmt: skip
def test_no_request_crashes_the_service_or_breaks_its_schema(
    client, method, path, valid, odd, raw
):
    pairs = [(k, v) for k, vs in valid.items() for v in ([vs] if isinstance(vs, str) else vs)]  # fmt: skip
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
            assert set(error) >= {"type", "loc", "msg", "input"}
            assert error["loc"][0] == "query"
            assert error["msg"].startswith(str(error["loc"][-1]))
    elif path == "/metrics" and response.status_code == 200:
        page = main.MetricsPage.model_validate(body)
        assert len(page.data) <= page.paging.limit


# CSV export ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{}, {"group_by": "placement,week", "sort": "-cpm"},
     {"group_by": "region", "region": "Mike,alpha"},
     {"group_by": "date,placement", "sort": "-clicks", "limit": "7", "offset": "5"}],
)  # fmt: skip
def test_a_csv_holds_the_rows_the_json_pages_hold(client, params):
    response = client.get("/metrics", params={**params, "format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert (
        response.headers["content-disposition"] == 'attachment; filename="metrics.csv"'
    )
    assert response.text.endswith("\r\n") and response.text.count("\n") == response.text.count("\r\n")  # fmt: skip
    header = response.text.split("\r\n")[0].split(",")
    assert header == (values(params, "group_by") or GRAIN) + main.METRICS
    if "limit" in params:  # that page, else every row
        json_rows = client.get("/metrics", params=params).json()["data"]
    else:
        json_rows = walk(client, {**params, "limit": "1000"})
    assert [{k: from_csv(v, row[k]) for k, v in line.items()}
            for line, row in zip(csv_rows(response), json_rows)] == json_rows  # fmt: skip
    assert len(csv_rows(response)) == len(json_rows)


def test_a_csv_of_no_rows_is_its_header_line(client):
    response = client.get("/metrics?region=Quebec&group_by=region&format=csv")
    assert response.status_code == 200
    assert response.text == (
        "region,impressions,clicks,cost,conversions,likes,ctr,cpc,cpm,cpa,"
        "conversion_rate\r\n"
    )


def test_the_time_limit_bounds_a_csv_s_first_rows_not_the_download(big_db, tmp_path):
    with TestClient(app_for(big_db, query_timeout=0.2, heartbeat=tmp_path)) as client:
        began = time.monotonic()
        response = client.get("/metrics?format=csv")
        [[facts]] = sqlite3.connect(big_db).execute(
            "SELECT count(*) FROM fact_ad_metrics_daily"
        )
        assert response.status_code == 200 and response.text.count("\r\n") == facts + 1
        assert time.monotonic() - began > 0.2  # longer than the limit, and complete
        late = client.get(f"/metrics?format=csv&{HEAVY}")  # its first row is too late
        assert late.status_code == 503 and "took longer than 0.2 s" in late.text


def test_downloads_stream_with_flat_memory_free_what_they_hold_and_are_capped(
    big_db, tmp_path
):
    server, url = serve(big_db, tmp_path / "server.log")
    port, stalled = int(url.rsplit(":", 1)[1]), []
    try:
        httpx.get(f"{url}/metrics?format=csv&limit=10")  # warm up
        before = memory(server, "VmRSS")
        whole = httpx.get(f"{url}/metrics?format=csv", timeout=60)
        assert whole.status_code == 200 and "content-length" not in whole.headers
        assert len(whole.content) > 8_000_000  # streamed, in far less memory:
        assert memory(server, "VmHWM") - before < 25
        threads = len(os.listdir(f"/proc/{server.pid}/task"))
        for _ in range(12):  # more than the cap, each left mid-download
            start_download(port).close()
        time.sleep(0.5)
        stalled += [start_download(port) for _ in range(8)]  # the cap: all free again
        one_more = httpx.get(f"{url}/metrics?format=csv")
        assert one_more.status_code == 503
        assert one_more.json() == {"detail": "8 downloads are under way; retry later"}
        assert httpx.get(f"{url}/metrics?group_by=platform").status_code == 200
        for download in stalled:
            download.close()
        wait_until(lambda: len(os.listdir(f"/proc/{server.pid}/task")) <= threads)
        assert httpx.get(f"{url}/metrics?format=csv&limit=1").status_code == 200
    finally:
        for download in stalled:
            download.close()
        stop(server)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


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
    if url.startswith("/metrics"):  # a bad request is a 422, whatever its tag
        bad = client.get(f"{url}&region=Atlantis", headers={"If-None-Match": "*"})
        assert bad.status_code == 422


def test_each_request_has_its_own_tag_and_every_instance_the_same(db_path, tmp_path):
    urls = ["/metrics", "/metrics?limit=5", "/metrics?limit=5&format=csv",
            "/metrics?group_by=week", "/dimensions"]  # fmt: skip
    tags = []
    for name in ("one", "two"):  # two workers, say, or a restart
        with TestClient(app_for(db_path, heartbeat=tmp_path / name)) as client:
            tags.append([client.get(url).headers["etag"] for url in urls])
    assert tags[0] == tags[1] and len(set(tags[0])) == len(urls)


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_any_write_changes_the_tag_even_two_within_one_clock_tick(
    db_path, journal_mode
):
    set_journal_mode(db_path, journal_mode)
    url, likes = "/metrics?group_by=week", sum(f["likes"] for f in FACTS)
    with TestClient(app_for(db_path)) as client:
        client.get(url)
        time.sleep(0.15)  # the -wal SQLite created as the service opened it settles
        tag = client.get(url).headers["etag"]
        assert client.get(url, headers={"If-None-Match": tag}).status_code == 304
        add_a_like(db_path)
        first = client.get(url, headers={"If-None-Match": tag})
        assert first.status_code == 200 and first.json()["totals"]["likes"] == likes + 1
        # A second write of the same size, its clock tick the first one's.
        stamps = {
            f: os.stat(f) for f in (db_path, f"{db_path}-wal") if os.path.exists(f)
        }
        add_a_like(db_path)
        for f, st in stamps.items():
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        second = client.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert (
            second.status_code == 200 and second.json()["totals"]["likes"] == likes + 2
        )
        time.sleep(0.15)  # once the file has settled, its tag holds again
        tag = client.get(url).headers["etag"]
        assert client.get(url, headers={"If-None-Match": tag}).status_code == 304


# GET /dimensions and GET /health -------------------------------------------------------


def test_dimensions_lists_names_in_table_order(client):
    response = client.get("/dimensions")
    assert response.status_code == 200
    assert response.json() == {
        "date": {"first": "2025-01-27", "last": "2025-02-15"},
        **{dim: [names[i] for i in sorted(names)] for dim, (*_, names) in DIMS.items()},
    }


def test_health_reports_the_data_and_the_heartbeat(client):
    body = wait_until(
        lambda: (b := client.get("/health").json())["scheduler"]["last_run"] and b
    )
    [(slot, ran_at, _)] = job_runs(client.app.state.settings.heartbeat_db)
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
    assert slot.endswith(("T00:00:00+00:00", "T06:00:00+00:00", "T12:00:00+00:00",
                          "T18:00:00+00:00"))  # fmt: skip


def test_health_is_right_from_the_first_request(db_path, tmp_path):
    slot = slot_at(time.time(), 21600)
    heartbeat_db = tmp_path / "heartbeat.db"
    with sqlite3.connect(heartbeat_db) as db:  # another worker ran the latest slot
        db.execute(main.JOB_RUNS_SQL)
        db.execute("INSERT INTO job_runs VALUES (?, ?, 1)", [slot, slot])
    with TestClient(app_for(db_path)) as client:
        scheduler = client.get("/health").json()["scheduler"]
    assert scheduler["last_run"] == {"slot": slot, "ran_at": slot}
    assert scheduler["overdue"] is False


@pytest.mark.parametrize(
    "last_slot_age, seconds_into_slot, overdue",
    [(0, 30, False), (0, 3600, False), (None, 30, False), (None, 61, True), (1, 61, True)],
)  # fmt: skip
def test_health_says_overdue_when_the_latest_slot_has_no_run_after_a_minute(
    last_slot_age, seconds_into_slot, overdue
):
    heartbeat = main.Heartbeat("unused.db", 21600)
    now = 1_800_000_000 // 21600 * 21600 + seconds_into_slot
    slot = slot_at(now - 21600 * (last_slot_age or 0), 21600)
    last_run = None if last_slot_age is None else {"slot": slot, "ran_at": "…"}
    assert heartbeat.overdue(last_run, now) is overdue


def test_openapi_documents_every_parameter_and_response(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/metrics"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert list(params) == ["start_date", "end_date", *DIMS, "group_by", "sort",
                            "limit", "offset", "format"]  # fmt: skip
    assert all(p["in"] == "query" and p.get("description") for p in params.values())
    limit = params["limit"]["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)
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
    assert {"200", "304", "503"} <= set(
        spec["paths"]["/dimensions"]["get"]["responses"]
    )


# The file under the service: written, reseeded, removed, replaced ----------------------


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_rows_dates_and_names_written_in_place_are_served_at_once(
    db_path, journal_mode
):
    set_journal_mode(db_path, journal_mode)
    with TestClient(app_for(db_path)) as client:
        assert client.get("/metrics?region=Arctic").status_code == 422
        with sqlite3.connect(db_path) as db:  # a loader adds a day and a region
            db.execute("INSERT INTO dim_region VALUES (11, 'Arctic')")
            db.execute("INSERT INTO dim_date VALUES (300, '2025-02-16')")
            db.execute("INSERT INTO fact_ad_metrics_daily VALUES "
                       "(300, 11, 4, 2, 9, 1, 8, 500, 5, 1.25, 1, 2)")  # fmt: skip
        response = client.get("/metrics?region=arctic")
        assert response.status_code == 200
        [row] = response.json()["data"]
        assert (row["date"], row["region"], row["impressions"]) == (
            "2025-02-16",
            "Arctic",
            500,
        )
        dimensions = client.get("/dimensions").json()
        assert dimensions["region"][-1] == "Arctic"
        assert dimensions["date"]["last"] == "2025-02-16"


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_seed_force_over_the_served_file_is_served_within_2_s_and_leaves_it_whole(
    tmp_path, journal_mode
):
    path = tmp_path / "ads.db"
    seed.seed(path, days=5, density=0.05)
    set_journal_mode(path, journal_mode)
    with TestClient(app_for(path)) as client:
        assert client.get("/dimensions").json()["date"]["last"] == "2025-01-05"
        seed.seed(path, days=9, density=0.05, force=True)
        reseeded = time.monotonic()
        wait_until(
            lambda: client.get("/dimensions").json()["date"]["last"] == "2025-01-09"
        )
        assert time.monotonic() - reseeded < 2
        assert client.get("/metrics?group_by=date").json()["paging"]["total_rows"] == 9
    assert integrity(path) == "ok"
    assert (
        sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        == journal_mode
    )


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_removed_file_is_a_503_naming_it_never_recreated_and_served_once_back(
    tmp_path, journal_mode
):
    path = build_db(tmp_path / "ads.db")
    set_journal_mode(path, journal_mode)
    shutil.copy(path, tmp_path / "spare.db")
    with TestClient(app_for(path, heartbeat_interval=1)) as client:
        assert status_of(client) == (200, 200)
        path.unlink()
        missing = {"detail": f"database {path} is missing"}
        for url in ("/metrics", "/metrics?format=csv", "/dimensions"):
            answer = client.get(url)
            assert (answer.status_code, answer.json()) == (503, missing)
        health = client.get("/health")
        assert (
            health.status_code == 503 and health.json()["reason"] == missing["detail"]
        )
        time.sleep(1.5)  # a heartbeat slot passes
        assert not path.exists()
        shutil.copy(tmp_path / "spare.db", path)
        check_page(client.get("/metrics?group_by=week"), {"group_by": "week"})
        assert status_of(client) == (200, 200)


def test_a_file_corrupted_in_place_is_a_503_until_it_is_mended(db_path):
    good = db_path.read_bytes()
    with TestClient(app_for(db_path)) as client:
        with db_path.open("r+b") as f:  # the same file, its content overwritten
            f.write(b"this is no longer a database" * 200)
        assert status_of(client) == (503, 503)
        assert "cannot be read: file is not a database" in client.get("/metrics").text
        db_path.write_bytes(good)
        check_page(client.get("/metrics?sort=-cost"), {"sort": "-cost"})


def test_a_file_replaced_under_load_is_followed_with_no_500_and_few_503s(tmp_path):
    path = build_db(tmp_path / "ads.db")
    copies = [build_db(tmp_path / f"copy{i}.db", v) for i, v in enumerate(["plain", "no unique key"])]  # fmt: skip
    server, url = serve(path, tmp_path / "server.log")
    statuses, errors, done = [], [], threading.Event()

    def ask():
        with httpx.Client(base_url=url, timeout=30) as http:
            while not done.is_set():
                try:
                    statuses.append(
                        http.get("/metrics?group_by=week,region&limit=5").status_code
                    )
                except httpx.HTTPError as e:
                    errors.append(e)

    clients = [threading.Thread(target=ask) for _ in range(12)]
    try:
        for thread in clients:
            thread.start()
        for i in range(15):  # a new file every 0.3 s (the bench does it for 15 s)
            shutil.copy(copies[i % 2], tmp_path / "next.db")
            os.replace(tmp_path / "next.db", path)
            time.sleep(0.3)
        done.set()
        for thread in clients:
            thread.join()
        assert not errors and statuses
        assert 500 not in statuses and statuses.count(503) <= len(statuses) * 0.05
        assert {
            httpx.get(f"{url}/metrics?group_by=week").status_code for _ in range(5)
        } == {200}
    finally:
        done.set()
        stop(server)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_the_data_file_is_never_written(db_path, journal_mode):
    set_journal_mode(db_path, journal_mode)
    before = sha256(db_path)
    with TestClient(app_for(db_path, heartbeat_interval=1)) as client:
        for params in QUERIES.values():
            assert client.get("/metrics", params=params).status_code == 200
        wait_until(lambda: len(job_runs(db_path.parent / "heartbeat.db")) >= 2)
    assert sha256(db_path) == before
    tables = (
        sqlite3.connect(db_path).execute("SELECT name FROM sqlite_master").fetchall()
    )
    assert ("job_runs",) not in tables  # the heartbeat's runs are in a file of its own


def test_a_data_file_the_service_cannot_write_is_served_and_the_heartbeat_goes_on(
    tmp_path,
):
    data = tmp_path / "data"
    data.mkdir()
    path = build_db(data / "ads.db")
    read_only = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(data)]  # fmt: skip
    touch = [*read_only, "touch", str(data / "x")]
    probe = subprocess.run(touch, check=False, capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"no read-only mount can be made here: {probe.stderr.strip()}")
    before = sha256(path)
    server, url = serve(path, tmp_path / "server.log", prefix=read_only,
                        HEARTBEAT_INTERVAL_SECONDS="1")  # fmt: skip
    try:
        check_page(
            httpx.get(f"{url}/metrics?group_by=month,region"),
            {"group_by": "month,region"},
        )
        wait_until(lambda: len(job_runs(tmp_path / "heartbeat.db")) >= 2)
    finally:
        stop(server)
    assert sha256(path) == before and sorted(os.listdir(data)) == ["ads.db"]


# Time limits: one request's limit never reaches another's query ------------------------

HEAVY = "group_by=region,age_group,gender,platform,placement,device_type&sort=-ctr"
LIGHT = {"start_date": "2025-01-03", "end_date": "2025-01-03", "region": "Oceania"}


def ask(path: Path, timeout: float, urls: list[str], at_once=True) -> list[tuple]:
    """Send the requests to one app, together or in turn; each (status, body, secs)."""

    async def ask_all():
        app = app_for(path, query_timeout=timeout)
        transport = httpx.ASGITransport(app=app)
        async with main.lifespan(app), httpx.AsyncClient(transport=transport) as http:

            async def one(url):
                began = time.monotonic()
                response = await http.get(f"http://test{url}")
                return response.status_code, response.json(), time.monotonic() - began

            if at_once:
                return await asyncio.gather(*(one(url) for url in urls))
            return [await one(url) for url in urls]

    return asyncio.run(ask_all())


def test_waiting_and_running_share_one_time_limit(big_db, monkeypatch):
    monkeypatch.setattr(main, "STATEMENTS", 2)  # eight requests for two connections
    answers = ask(big_db, 0.5, [f"/metrics?{HEAVY}"] * 8)
    assert max(seconds for _, _, seconds in answers) <= 0.5 + 0.25
    stopped = {"detail": "the query took longer than 0.5 s and was stopped; narrow "
               "the date range, add filters or group by fewer fields"}  # fmt: skip
    assert stopped in [body for status, body, _ in answers if status == 503]
    assert {status for status, _, _ in answers} == {200, 503}


def test_a_query_past_the_time_limit_stops_and_no_other_request_fails(
    big_db, monkeypatch
):
    monkeypatch.setattr(main, "STATEMENTS", 1)  # one connection: the light ones next
    light = "/metrics?" + "&".join(f"{k}={quote(v)}" for k, v in LIGHT.items())
    answers = ask(big_db, 0.1, [f"/metrics?{HEAVY}", light] * 10, at_once=False)
    assert [status for status, _, _ in answers] == [503, 200] * 10
    expected = httpx.Response(200, json=answers[1][1])
    monkeypatch.setattr(main, "STATEMENTS", 4)  # heavy ones alongside light ones
    answers = ask(big_db, 0.3, [f"/metrics?{HEAVY}"] * 3 + [light] * 20)
    assert all(body == expected.json() for _, body, _ in answers[3:])


# The heartbeat -------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [7, 21600])
def test_heartbeat_slots_fall_on_the_epoch_grid_across_restarts(db_path, interval):
    for _ in range(2):  # a start, then a restart
        with TestClient(app_for(db_path, heartbeat_interval=interval)) as client:
            job = client.app.state.heartbeat.scheduler.get_job("heartbeat")
            wait_until(lambda j=job: j.next_run_time.timestamp() > time.time())
            next_run = job.next_run_time.timestamp()
            assert next_run % interval == 0 and 0 < next_run - time.time() <= interval
            health = client.get("/health").json()["scheduler"]
            assert datetime.fromisoformat(health["next_run_at"]).timestamp() == next_run
    runs = job_runs(db_path.parent / "heartbeat.db")
    assert runs and all(
        datetime.fromisoformat(s).timestamp() % interval == 0 for s, _, _ in runs
    )


def test_the_latest_slot_runs_at_start_if_it_has_no_run_and_not_again(db_path, caplog):
    heartbeat_db = db_path.parent / "heartbeat.db"
    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        with TestClient(app_for(db_path)):
            [(slot, ran_at, pid)] = wait_until(lambda: job_runs(heartbeat_db))
        assert slot == slot_at(datetime.fromisoformat(ran_at).timestamp(), 21600)
        assert pid == os.getpid()
        assert heartbeats(caplog) == [f"heartbeat slot={slot} ran_at={ran_at}"]
        caplog.clear()
        with TestClient(app_for(db_path)) as client:
            job = client.app.state.heartbeat.scheduler.get_job("heartbeat")
            wait_until(lambda: job.next_run_time.timestamp() > time.time())
        assert (
            job_runs(heartbeat_db) == [(slot, ran_at, pid)] and heartbeats(caplog) == []
        )


def test_two_instances_on_one_file_record_each_slot_once(tmp_path, caplog):
    heartbeat_db = tmp_path / "heartbeat.db"

    async def race():
        beats = [main.Heartbeat(str(heartbeat_db), 3600) for _ in range(2)]
        await asyncio.gather(*(beat.run() for beat in beats))

    with caplog.at_level(logging.INFO, logger="ad_metrics"):
        for _ in range(10):
            heartbeat_db.unlink(missing_ok=True)
            caplog.clear()
            asyncio.run(race())
            assert len(job_runs(heartbeat_db)) == 1 and len(heartbeats(caplog)) == 1
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_claim_waits_for_the_lock_and_blocks_no_request(db_path):
    heartbeat_db = db_path.parent / "heartbeat.db"
    with TestClient(app_for(db_path, heartbeat_interval=2)) as client:
        wait_until(lambda: job_runs(heartbeat_db))
        locker = sqlite3.connect(heartbeat_db, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another worker's write: the claim waits
        due, answered = (time.time() // 2 + 1) * 2, 0
        while time.time() < due + 0.8:  # the run for `due` has started, and waits
            for url in ("/metrics?group_by=platform&sort=-cost", "/health"):
                assert client.get(url).status_code == 200
                answered += 1
        assert slot_at(due, 2) not in [slot for slot, _, _ in job_runs(heartbeat_db)]
        released = time.time()
        locker.execute("COMMIT")
        ran_at = wait_until(lambda: {s: r for s, r, _ in job_runs(heartbeat_db)}.get(slot_at(due, 2)))  # fmt: skip
    assert answered > 10  # answered all along while the claim waited
    assert due <= datetime.fromisoformat(ran_at).timestamp() < released


def test_a_claim_waits_through_busy_recovery(tmp_path, caplog, monkeypatch):
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
        asyncio.run(main.Heartbeat(str(tmp_path / "heartbeat.db"), 3600).run())
    assert len(attempts) == 3 and len(job_runs(tmp_path / "heartbeat.db")) == 1
    assert len(heartbeats(caplog)) == 1 and "failed" not in caplog.text


def test_a_failing_run_is_logged_with_its_traceback_and_the_next_slot_runs(
    db_path, caplog
):
    heartbeat_db = db_path.parent / "heartbeat.db"
    with (
        caplog.at_level(logging.INFO, logger="ad_metrics"),
        TestClient(app_for(db_path, heartbeat_interval=1)) as client,
    ):
        wait_until(lambda: job_runs(heartbeat_db))
        db = sqlite3.connect(heartbeat_db, isolation_level=None)
        db.execute("CREATE TRIGGER no_heartbeat BEFORE INSERT ON job_runs "
                   "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")  # fmt: skip
        failure = wait_until(lambda: [r for r in caplog.records if r.levelno == logging.ERROR])[0]  # fmt: skip
        assert status_of(client) == (200, 200)
        db.execute("DROP TRIGGER no_heartbeat")
        failed_at = time.time()
        wait_until(lambda: datetime.fromisoformat(job_runs(heartbeat_db)[-1][1]).timestamp() > failed_at)  # fmt: skip
    assert failure.getMessage().endswith("failed") and failure.exc_info
    assert "injected failure" in caplog.text and "Traceback" in caplog.text


def test_sigterm_while_a_claim_waits_stops_cleanly_and_the_log_tells_the_truth(
    tmp_path,
):
    db, heartbeat_db = build_db(tmp_path / "ads.db"), tmp_path / "heartbeat.db"
    server, url = serve(db, tmp_path / "server.log", HEARTBEAT_INTERVAL_SECONDS="2")
    wait_until(lambda: job_runs(heartbeat_db))
    locker = sqlite3.connect(heartbeat_db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the next run's claim waits for this lock...
    time.sleep((time.time() // 2 + 1) * 2 - time.time() + 0.3)  # ...and is waiting now
    assert httpx.get(f"{url}/metrics?group_by=week,region").status_code == 200
    status = stop(server)
    locker.execute("ROLLBACK")
    log = (tmp_path / "server.log").read_text()
    assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in log
    [waiting] = [line for line in log.splitlines() if "not recorded" in line]
    assert waiting.endswith("not recorded: the server is stopping")
    assert waiting.split("slot=")[1].split()[0] not in [
        s for s, _, _ in job_runs(heartbeat_db)
    ]
    for bad in ("Traceback", "ResourceWarning", "Task was destroyed", "ERROR"):
        assert bad not in log


# Start-up, and python main.py ----------------------------------------------------------


def test_three_workers_start_every_time_and_log_each_slot_once(tmp_path):
    db, heartbeat_db = build_db(tmp_path / "ads.db"), tmp_path / "heartbeat.db"
    set_journal_mode(db, "delete")  # SQLite's default: the file once held them up
    for attempt in range(5):
        log = tmp_path / f"server{attempt}.log"
        server, url = serve(db, log, "--workers", "3", HEARTBEAT_INTERVAL_SECONDS="1")
        try:
            up = "Application startup complete"
            wait_until(lambda log=log, up=up: log.read_text().count(up) == 3)
            assert httpx.get(f"{url}/health").json()["status"] == "ok"
            time.sleep(3 if attempt == 4 else 0)  # slots pass, with three to claim them
        finally:
            stop(server)
    runs, logs = job_runs(heartbeat_db), "".join(p.read_text() for p in tmp_path.glob("*.log"))  # fmt: skip
    logged = [line.split("slot=")[1].split()[0] for line in logs.splitlines() if " ran_at=" in line]  # fmt: skip
    assert sorted(logged) == [
        slot for slot, _, _ in runs
    ]  # each logged once, as recorded
    stamps = [datetime.fromisoformat(slot).timestamp() for slot, _, _ in runs]
    assert len(stamps) >= 5 and [b - a for a, b in pairwise(stamps[-3:])] == [1, 1]
    assert "Traceback" not in logs and "not recorded" not in logs


@pytest.mark.parametrize(
    "content, message",
    [(b"not a database at all" * 100, "cannot be read: file is not a database"),
     (b"", "cannot be read: no such table: fact_ad_metrics_daily")],
    ids=["not a database", "an empty file"],
)  # fmt: skip
def test_an_unusable_data_file_stops_start_up_saying_so(tmp_path, content, message):
    path = tmp_path / "ads.db"
    path.write_bytes(content)
    with pytest.raises(main.StartupError) as stopped, TestClient(app_for(path)):
        pass
    assert str(stopped.value) == f"database {path} {message}"


def test_uvicorn_without_a_data_file_stops_saying_how_to_create_one(tmp_path):
    path = tmp_path / "ads.db"
    result = run("-m", "uvicorn", "main:app", "--port", "0", env={"ADS_DB": str(path)})
    assert result.returncode == 3 and not path.exists()  # stopped, and created nothing
    message = f"database {path} not found; create it with: python seed.py --db {path}"
    assert f"main.StartupError: {message}" in result.stderr.splitlines()


def test_an_old_sqlite_stops_start_up(db_path, monkeypatch):
    monkeypatch.setattr(main.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(main.sqlite3, "sqlite_version", "3.31.1")
    old = r"^SQLite 3.35\+ is needed, not 3.31.1$"
    with pytest.raises(main.StartupError, match=old), TestClient(app_for(db_path)):
        pass


def test_python_main_py_seeds_serves_and_ends_a_stalled_download_on_sigterm(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "ADS_DB": str(tmp_path / "new.db"), "PORT": str(port),
           "HEARTBEAT_DB": str(tmp_path / "heartbeat.db"), "QUERY_TIMEOUT_SECONDS": "1"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "main.py"], cwd=HERE, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        health = wait_until(
            lambda: probe(f"http://127.0.0.1:{port}/health"), timeout=60
        )
        assert health.status_code == 200 and health.json()["status"] == "ok"
        dims = httpx.get(f"http://127.0.0.1:{port}/dimensions").json()
        assert dims["date"] == {"first": "2025-01-01", "last": "2025-12-31"}
        assert "Native, Banner & Interstitial" in dims["placement"]
        stalled = start_download(port)  # and reads no more
        time.sleep(0.5)
        asked = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) in (0, -signal.SIGTERM)
        assert time.monotonic() - asked < 3  # the query time limit, and a little
        stalled.close()
    finally:
        server.kill()
    assert (
        "seeded " in log.read_text()
        and "Application shutdown complete" in log.read_text()
    )


# seed.py ----------------------------------------------------------------------------------


def test_seed_is_deterministic_and_realistic(tmp_path):
    a = seed.seed(tmp_path / "a.db", days=10, seed=3)
    b = seed.seed(tmp_path / "b.db", days=10, seed=3)
    seed.seed(tmp_path / "c.db", days=10, seed=4)
    everything = "SELECT * FROM fact_ad_metrics_daily ORDER BY 1, 2, 3, 4, 5, 6, 7"
    rows = {n: sqlite3.connect(tmp_path / f"{n}.db").execute(everything).fetchall() for n in "abc"}  # fmt: skip
    assert a == b == len(rows["a"]) and rows["a"] == rows["b"] != rows["c"]
    db = sqlite3.connect(tmp_path / "a.db")
    [[wrong_places]] = db.execute(
        "SELECT count(*) FROM fact_ad_metrics_daily JOIN dim_platform USING (platform_id) "
        "JOIN dim_placement USING (placement_id) JOIN dim_device_type USING (device_type_id) "
        "WHERE (placement_name IN ('Stories', 'Reels', 'Explore') AND device_type_name = 'Desktop') "
        "OR (platform_name = 'Audience Network' AND placement_name NOT IN "
        "('Native, Banner & Interstitial', 'Rewarded Video')) "
        "OR (placement_name = 'Right Column' AND device_type_name != 'Desktop')"
    )  # fmt: skip
    [[impossible]] = db.execute(
        "SELECT count(*) FROM fact_ad_metrics_daily WHERE conversions > clicks "
        "OR likes > impressions OR cost < 0"
    )
    assert wrong_places == impossible == 0
    ages = db.execute("SELECT age_range FROM dim_age_group ORDER BY age_id").fetchall()
    assert [a for (a,) in ages] == ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"]


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
    for bad in (["--days", "0"], ["--density", "1.5"], ["--start", "2025-13-01"]):
        result = run("seed.py", "--db", str(tmp_path / "other.db"), *bad)
        assert result.returncode == 2 and result.stderr.strip(), bad
    assert not (tmp_path / "other.db").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_seed_force_killed_while_copying_leaves_the_old_data_whole(
    tmp_path, journal_mode
):
    target = tmp_path / "ads.db"
    seed.seed(target, days=3)
    set_journal_mode(target, journal_mode)
    before = dump(target)
    journal = Path(f"{target}-{'wal' if journal_mode == 'wal' else 'journal'}")
    process = subprocess.Popen([sys.executable, "seed.py", "--db", str(target), "--days",
                                "200", "--density", "0.45", "--force"], cwd=HERE)  # fmt: skip
    # The copy into the target is under way once it has a journal with pages in it.
    wait_until(
        lambda: journal.exists() and journal.stat().st_size > 8192,
        timeout=60,
        step=0.001,
    )
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert dump(target) == before and integrity(target) == "ok"


def test_a_seed_killed_while_building_leaves_the_previous_database(tmp_path):
    target = tmp_path / "ads.db"
    seed.seed(target, days=3)
    before = dump(target)
    process = subprocess.Popen([sys.executable, "seed.py", "--db", str(target), "--days",
                                "365", "--density", "0.45", "--force"], cwd=HERE)  # fmt: skip
    wait_until(lambda: list(tmp_path.glob(".ads.db.*.tmp")))  # it is writing
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert dump(target) == before


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
    one of the variants that a valid file may take. Its clock is set a second back, so
    that the file has settled (see main.Signature) before the first request."""
    db = sqlite3.connect(path)
    date_ids = IN_ORDER_IDS if variant == "date ids in date order" else SHUFFLED_IDS
    twice = variant == "dimension rows loaded twice"
    key, count = (
        "" if twice else " PRIMARY KEY",
        "REAL" if "reals" in variant else "INTEGER",
    )
    odd = variant == "extra columns named like ours"  # a fiscal calendar, say
    extra = ", month TEXT DEFAULT 'P01', week INTEGER DEFAULT 1, cost REAL DEFAULT 1e9"
    db.execute(
        f"CREATE TABLE dim_date (date_id INTEGER{key}, date_value TEXT{extra * odd})"
    )
    dates = [(i, d) for d, i in date_ids.items()] * (1 + twice)
    db.executemany("INSERT INTO dim_date (date_id, date_value) VALUES (?, ?)", dates)
    extra = ", cost REAL DEFAULT 5, impressions INTEGER DEFAULT 3, date_id INTEGER"
    for table, id_col, name_col, names in DIMS.values():
        db.execute(
            f"CREATE TABLE {table} ({id_col} INTEGER{key}, {name_col} TEXT{extra * odd})"
        )
        db.executemany(
            f"INSERT INTO {table} ({id_col}, {name_col}) VALUES (?, ?)",
            list(names.items()) * (1 + twice),
        )
    ids = ", ".join(d[1] for d in DIMS.values())
    unique = "" if variant == "no unique key" else f", PRIMARY KEY (date_id, {ids})"
    db.execute(
        f"CREATE TABLE fact_ad_metrics_daily (date_id INTEGER, {ids}, impressions {count}, "
        f"clicks {count}, cost REAL, conversions {count}, likes {count}{unique})"
    )
    db.executemany(
        "INSERT INTO fact_ad_metrics_daily VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            (
                date_ids.get(f["day"], f["date_id"]),
                *(f[d] for d in DIMS),
                f["impressions"],
                f["clicks"],
                f["cost"] / 100,
                f["conversions"],
                f["likes"],
            )
            for f in FACTS
        ],
    )
    db.commit()
    db.close()
    past = time.time() - 1
    os.utime(path, (past, past))
    return path  # fmt: skip


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
    assert_rows_equal(body["data"], groups[offset : offset + limit])
    assert_rows_equal([body["totals"]], [totals])
    paging = body["paging"]
    assert (paging["limit"], paging["offset"], paging["total_rows"]) == (
        limit,
        offset,
        len(groups),
    )
    assert (paging["next"] is None) == (offset + limit >= len(groups))
    for row in body["data"]:  # the grouped fields, in group_by order, then the metrics
        assert list(row) == (values(params, "group_by") or GRAIN) + main.METRICS
    return body


def assert_rows_equal(rows: list[dict], expected: list[dict]) -> None:
    """The same rows in the same order: ratios to 2e-6 (SQLite rounds a double the
    reference rounds exactly), every other value exactly."""
    assert [list(row) for row in rows] == [list(row) for row in expected]
    for row, want in zip(rows, expected):
        for key, value in want.items():
            if key in main.RATIOS and value is not None and row[key] is not None:
                assert abs(row[key] - value) <= 2e-6, (key, row, want)
            else:
                assert row[key] == value, (key, row, want)


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


def csv_rows(response) -> list[dict]:
    return list(csv.DictReader(io.StringIO(response.text)))


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


# Helpers ------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path) -> Path:
    return build_db(tmp_path / "ads.db")


@pytest.fixture
def client(db_path):
    """The service on the fixture database; afterwards, its data must be unchanged."""
    before = dump(db_path)
    with TestClient(app_for(db_path)) as client:
        yield client
    assert dump(db_path) == before


@pytest.fixture(scope="session")
def big_db(tmp_path_factory) -> Path:
    """A seeded database of about 175,000 rows, for time limits and downloads."""
    path = tmp_path_factory.mktemp("big") / "big.db"
    seed.seed(path, days=60, density=0.45)
    past = time.time() - 1
    os.utime(path, (past, past))
    return path


def app_for(path: Path, heartbeat: Path | None = None, **settings):
    """The service on path, its heartbeat's file beside it (or in heartbeat)."""
    heartbeat_db = (heartbeat or path.parent) / "heartbeat.db"
    (heartbeat or path.parent).mkdir(exist_ok=True)
    return main.create_app(
        main.Settings(db_path=str(path), heartbeat_db=str(heartbeat_db), **settings)
    )


def set_journal_mode(path: Path, mode: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA journal_mode = {mode}")
    past = time.time() - 1
    os.utime(path, (past, past))


def add_a_like(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE fact_ad_metrics_daily SET likes = likes + 1 WHERE rowid = 1")


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return list(db.iterdump())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    """The heartbeat's rows, in slot order; none if there is no table yet."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute(
                "SELECT slot, ran_at, pid FROM job_runs ORDER BY slot"
            ).fetchall()
    except sqlite3.OperationalError:
        return []


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


def serve(db: Path, log: Path, *args: str, prefix=(), **env: str):
    """Start `uvicorn main:app` on db in a process of its own; return it and its URL."""
    port = free_port()
    command = [
        *prefix,
        sys.executable,
        "-W",
        "default",
        "-m",
        "uvicorn",
        "main:app",
        "--port",
        str(port),
        *args,
    ]
    env = {
        **os.environ,
        "ADS_DB": str(db),
        "HEARTBEAT_DB": str(log.parent / "heartbeat.db"),
        **env,
    }
    process = subprocess.Popen(
        command, cwd=HERE, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
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


def memory(server: subprocess.Popen, field: str) -> float:
    """The server's resident memory (VmRSS) or its peak (VmHWM), in MB."""
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


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
