"""The Ad Metrics API's specification, as tests.

Every /metrics answer is compared with `reference()`, near the end: the contract read
again, in plain Python, over the rows the fixture file is built from. The fixture has
sparse ids out of name order, date ids shuffled, a name holding a comma and quotes,
refunds, and fact rows whose ids (the date's too) are in no dimension table.
"""

import asyncio
import hashlib
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
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from itertools import product
from pathlib import Path
from unittest.mock import patch
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

warnings.filterwarnings("ignore", message=".*httpx2.*")  # Starlette's TestClient notice
VARIABLES = ["ADS_DB", "HOST", "PORT", "HEARTBEAT_INTERVAL_SECONDS", "LOG_LEVEL",
             "QUERY_TIMEOUT_SECONDS"]  # fmt: skip
for name in VARIABLES:  # the tests set what they need; nothing comes from the shell
    os.environ.pop(name, None)
from fastapi.testclient import TestClient

import main
import seed

HERE = Path(__file__).parent
MISSING = "database {0} is missing; create it with: python seed.py --db {0}"


# Settings -----------------------------------------------------------------------------


def test_settings_come_from_the_environment_with_defaults():
    env = {"ADS_DB": "a.db", "PORT": "9000", "QUERY_TIMEOUT_SECONDS": "2.5"}
    assert main.Settings.from_env(env).model_dump() == {"db_path": "a.db", "host": "127.0.0.1", "port": 9000, "log_level": "INFO", "heartbeat_interval": 21600, "query_timeout": 2.5}  # fmt: skip


@pytest.mark.parametrize(
    "name, value, message",
    [("PORT", "70000", "less than or equal to 65535"),
     ("HEARTBEAT_INTERVAL_SECONDS", "0", "greater than or equal to 1"),
     ("QUERY_TIMEOUT_SECONDS", "nan", "less than or equal to 3600"),
     ("LOG_LEVEL", "loud", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'")],
)  # fmt: skip
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(name, value, message):
    with pytest.raises(SystemExit) as stop:
        main.Settings.from_env({name: value})
    assert str(stop.value).startswith(f"{name}={value!r}: ")
    assert message in str(stop.value)


def test_uvicorn_with_a_bad_setting_prints_that_line_alone(db_path):
    env = os.environ | {"ADS_DB": str(db_path), "PORT": "http"}
    command = [sys.executable, "-m", "uvicorn", "main:app"]
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, check=False)
    message = "Input should be a valid integer, unable to parse string as an integer"
    assert (done.returncode, done.stderr.decode()) == (1, f"PORT='http': {message}\n")


# GET /metrics: every answer is the reference's ----------------------------------------

QUERIES = {
    "default: a row per fact row": {},
    "a date range": {"start_date": "2025-02-01", "end_date": "2025-02-03"},
    "filters, in any case": {"region": ["alpha", "ZULU"], "platform": "instagram"},
    "every filter": {"region": "Zulu", "age_group": "18-24", "gender": "FEMALE",
                     "platform": "Facebook", "placement": ["Feed", "Reels"],
                     "device_type": "Mobile"},
    "a name with a comma and quotes": {"placement": 'native, banner & "interstitial"'},
    "by date, newest first": {"group_by": "date", "sort": "-date"},
    "by month and region": {"group_by": ["month", "region"]},
    "by region and week": {"group_by": ["region", "week"], "start_date": "2025-02-01"},
    "top platforms by cost": {"group_by": "platform", "sort": "-cost"},
    "ctr, null last": {"group_by": ["date", "region"], "sort": "ctr"},
    "ctr descending, null last": {"group_by": ["date", "region"], "sort": "-ctr"},
    "a name descending": {"group_by": ["device_type", "age_group"], "sort": "-age_group"},
    "two sort keys and a page": {"group_by": ["region", "gender", "placement"],
                                 "sort": ["-cpa", "likes"], "limit": "5", "offset": "2"},
    "the grain in another order": {"group_by": ["placement", "platform", "device_type",
                                                "gender", "age_group", "region", "date"]},
    "the grain by cpm": {"sort": ["-cpm", "conversion_rate"], "limit": "1000"},
    "an offset past the end": {"group_by": "platform", "offset": "50"},
    "the largest offset": {"offset": str(2**63 - 1)},
}  # fmt: skip


@pytest.mark.parametrize("params", QUERIES.values(), ids=QUERIES.keys())
def test_metrics_match_the_reference(fixture_db, params):
    with serve(fixture_db) as client:
        check_page(client.get("/metrics", params=params), params)


VARIANTS = ["date ids in date order", "extra columns named like ours",
            "counts stored as reals", "no unique key"]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_any_file_with_the_schema_gives_the_same_answers(tmp_path, variant):
    with serve(build_db(tmp_path / "ads.db", variant)) as client:
        for params in [{}, {"group_by": "week"}, {"group_by": ["month", "region"]},
                       {"group_by": "date", "sort": "-date"}, {"offset": "400"}]:  # fmt: skip
            check_page(client.get("/metrics", params=params), params)


def test_any_valid_query_matches_the_reference(fixture_db):
    with serve(fixture_db) as client:

        @settings(deadline=None, derandomize=True, max_examples=80)
        @given(params=VALID)
        def check(params):
            check_page(client.get("/metrics", params=params), params)

        check()


def test_following_next_walks_the_whole_answer_once(fixture_db):
    params = {"group_by": ["week", "device_type"], "sort": "-cost", "limit": "4"}
    with serve(fixture_db) as client:
        pages = [client.get("/metrics", params=params).json()]
        while pages[-1]["paging"]["next"]:
            assert pages[-1]["paging"]["next"].startswith("/metrics?")
            pages.append(client.get(pages[-1]["paging"]["next"]).json())
    rows = [row for page in pages for row in page["data"]]
    assert_rows_equal(rows, reference(params)[0])


def test_no_rows_give_zero_totals_and_null_ratios(fixture_db):
    zeros = {"impressions": 0, "clicks": 0, "cost": 0.0, "conversions": 0, "likes": 0,
             "ctr": None, "cpc": None, "cpm": None, "cpa": None, "conversion_rate": None}  # fmt: skip
    with serve(fixture_db) as client:
        empty = client.get("/metrics?region=quebec").json()
        day = "start_date=2025-02-03&end_date=2025-02-03"  # its Mike rows count nothing
        [row] = client.get(f"/metrics?group_by=region&region=Mike&{day}").json()["data"]
    paging = {"limit": 100, "offset": 0, "total_rows": 0, "next": None}
    assert empty == {"data": [], "totals": zeros, "paging": paging}
    assert row == {"region": "Mike", **zeros}


def test_a_fact_row_whose_id_is_in_no_table_is_kept_with_a_null_name(fixture_db):
    with serve(fixture_db) as client:
        regions = client.get("/metrics?group_by=region").json()["data"]
        days = client.get("/metrics?group_by=date").json()["data"]
        ranged = client.get("/metrics?start_date=2000-01-01").json()["totals"]
    assert [row["region"] for row in regions] == ["Alpha", "Mike", "Zulu", None]
    orphans = [f["impressions"] for f in FACTS if f["region"] >= ORPHAN]
    assert regions[-1]["impressions"] == sum(orphans) > 0
    assert days[-1]["date"] is None  # null last, and in no date range:
    assert ranged["impressions"] == sum(f["impressions"] for f in FACTS if f["day"])


def test_dimensions_list_names_by_id_and_a_name_stands_for_its_ids_in_any_case(db_path):
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE dim_region SET region_name = 'mike' WHERE region_id = 2")
        db.execute("UPDATE dim_region SET region_name = NULL WHERE region_id = 5")
        db.execute(
            "ALTER TABLE dim_age_group RENAME TO ages"
        )  # now a column of no type,
        db.execute("CREATE TABLE dim_age_group AS SELECT age_id, CASE age_id WHEN 4 "
                   "THEN 18 ELSE age_range END AS age_range FROM ages")  # fmt: skip
        db.execute("UPDATE fact_ad_metrics_daily SET cost = NULL WHERE age_id = 4")
    with serve(db_path) as client:  # where one name is a number, and costs are null
        dimensions = client.get("/dimensions").json()
        mikes = client.get("/metrics?region=MIKE&group_by=region").json()
        [age] = client.get("/metrics?age_group=18&group_by=age_group").json()["data"]
        [row] = client.get("/metrics?age_group=18&limit=1").json()["data"]
    names = {
        dim: [names[i] for i in sorted(names)] for dim, (*_, names) in DIMS.items()
    }
    names |= {"region": ["mike", "Mike", "Quebec"], "age_group": ["35-44", "18"]}
    assert dimensions == {"date": {"first": DAYS[0], "last": DAYS[-1]}, **names}
    assert [row["region"] for row in mikes["data"]] == ["Mike", "mike"]
    both = sum(f["impressions"] for f in FACTS if f["region"] in (2, 7))
    assert mikes["totals"]["impressions"] == both
    assert (age["age_group"], age["cost"], age["cpc"]) == ("18", 0.0, 0.0)
    assert (row["age_group"], row["cost"]) == ("18", 0.0)


def test_metrics_sort_as_shown_and_ties_by_the_group_by_fields(db_path):
    with sqlite3.connect(db_path) as db:  # Zulu's 0.1 + 0.2 is a hair over Alpha's 0.3
        db.execute("UPDATE fact_ad_metrics_daily SET cost = 0")
        for region, cost in [(2, 0.1), (2, 0.2), (5, 0.3), (7, 0.125)]:
            db.execute("UPDATE fact_ad_metrics_daily SET cost = ? WHERE rowid = "
                       "(SELECT min(rowid) FROM fact_ad_metrics_daily WHERE region_id = ? "
                       "AND cost = 0)", [cost, region])  # fmt: skip
    with serve(db_path) as client:
        rows = client.get("/metrics?group_by=region&sort=-cost").json()["data"]
    assert [(row["region"], row["cost"]) for row in rows] == [
        ("Alpha", 0.3), ("Zulu", 0.3), ("Mike", 0.13), (None, 0.0)]  # half a cent up  # fmt: skip


# GET /metrics: every client error is FastAPI's standard 422 ---------------------------

BAD = {  # name -> (query string, parameter in loc, text the message holds)
    "a number as a date": ("start_date=0", "start_date", "YYYY-MM-DD"),
    "a timestamp as a date": ("end_date=1740960000", "end_date", "YYYY-MM-DD"),
    "a datetime as a date": ("start_date=2025-03-01T00:00:00", "start_date", "YYYY-MM-DD"),
    "a date without dashes": ("start_date=20250301", "start_date", "YYYY-MM-DD"),
    "an impossible date": ("start_date=2025-02-30", "start_date", "day value is outside"),
    "the end before the start": ("start_date=2025-02-02&end_date=2025-02-01", "end_date",
                                 "end_date 2025-02-01 is before start_date 2025-02-02"),
    "an unknown name": ("region=Mars", "region", "'Mars' is not one of: Zulu, Alpha, Mike, Quebec"),
    "sql as a name": ("device_type=x' OR '1'='1", "device_type", "is not one of: Tablet, Mobile"),
    "part of a name": ("placement=Native", "placement", "'Native' is not one of"),
    "an empty name": ("platform=", "platform", "'' is not one of: Instagram, Facebook"),
    "an unknown group_by": ("group_by=country", "group_by", "Input should be 'date', 'week'"),
    "two periods": ("group_by=week&group_by=month", "group_by", "at most one period"),
    "a field twice": ("group_by=region&group_by=region", "group_by", "each field once"),
    "a sort not in the answer": ("group_by=platform&sort=region", "sort",
                                 "'region' is not one of platform, impressions"),
    "an unknown sort": ("sort=-profit", "sort", "'-profit' is not one of"),
    "a bad group_by, and a sort": ("group_by=x&sort=region", "group_by", "Input should be"),
    "limit 0": ("limit=0", "limit", "greater than or equal to 1"),
    "limit 1001": ("limit=1001", "limit", "less than or equal to 1000"),
    "offset -1": ("offset=-1", "offset", "greater than or equal to 0"),
    "an offset past SQLite's": (f"offset={2**63}", "offset", "less than or equal to"),
    "an unknown parameter": ("country=FR", "country", "Extra inputs are not permitted"),
}  # fmt: skip


@pytest.mark.parametrize("query, param, text", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_422_naming_the_parameter(fixture_db, query, param, text):
    with serve(fixture_db) as client:
        response = client.get(f"/metrics?{query}")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert {"type", "loc", "msg", "input"} <= set(error)
    assert error["loc"][:2] == ["query", param] and text in error["msg"]


def test_an_unknown_name_is_a_standard_422_listing_the_known_ones(fixture_db):
    with serve(fixture_db) as client:
        response = client.get("/metrics?region=alpha&region=Atlantis")
    message = "region 'Atlantis' is not one of: Zulu, Alpha, Mike, Quebec"
    error = {"type": "value_error", "loc": ["query", "region"], "msg": message}
    detail = [{**error, "input": ["alpha", "Atlantis"]}]
    assert (response.status_code, response.json()) == (422, {"detail": detail})


def test_no_request_crashes_the_service(fixture_db):
    with serve(fixture_db) as client:

        @settings(deadline=None, derandomize=True, max_examples=200)
        @given(
            method=st.sampled_from(["GET"] * 20 + ["POST", "DELETE", "HEAD"]),
            path=st.sampled_from(["/metrics"] * 20 + ["/dimensions", "/health", "/x"]),
            valid=VALID,
            odd=st.lists(ODD, max_size=2),
        )
        def check(method, path, valid, odd):
            pairs = [(k, v) for k, vs in valid.items() for v in as_list(vs)] + odd
            query = "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs)
            response = client.request(method, f"{path}?{query}")  # a 500 would raise
            known = path != "/x" and method == "GET"
            assert response.status_code in ((200, 422) if known else (404, 405))
            if response.status_code == 200 and path == "/metrics":
                page = main.MetricsPage.model_validate(response.json())
                assert len(page.data) <= page.paging.limit

        check()


def test_a_fault_in_the_service_s_own_sql_is_a_500_not_a_503(fixture_db):
    broken = patch.object(main, "SUMS_SQL", "no_such_function(1) AS impressions")
    with broken, serve(fixture_db) as client, pytest.raises(sqlite3.OperationalError):
        client.get("/metrics?group_by=region")


# GET /dimensions, GET /health and the OpenAPI document --------------------------------


def test_openapi_documents_every_parameter_and_answer(fixture_db):
    with serve(fixture_db) as client:
        paths = client.get("/openapi.json").json()["paths"]
    parameters = paths["/metrics"]["get"]["parameters"]
    assert len(parameters) == len(main.MetricsQuery.model_fields)
    assert all(parameter["description"] for parameter in parameters)
    for path, model in [("/metrics", "MetricsPage"), ("/dimensions", "Dimensions"), ("/health", "Health")]:  # fmt: skip
        responses = paths[path]["get"]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}  # fmt: skip
        assert "503" in responses


# The heartbeat ------------------------------------------------------------------------


def test_the_heartbeat_runs_at_start_up_then_on_a_six_hour_grid(fixture_db, caplog):
    with caplog.at_level(logging.INFO, logger="ad_metrics"), serve(fixture_db) as client:  # fmt: skip
        wait_until(lambda: client.get("/health").json()["scheduler"]["last_run"])
        health = client.get("/health").json()
    [line, *_] = [record for record in caplog.records if record.name == "ad_metrics"]
    ran_at = datetime.fromisoformat(line.getMessage().split(" ran at ")[1])
    assert ran_at.tzinfo == UTC and 0 <= line.created - ran_at.timestamp() < 2
    last_run = datetime.fromisoformat(health["scheduler"]["last_run"])
    next_run = datetime.fromisoformat(health["scheduler"]["next_run_at"])
    assert timedelta(0) <= last_run - ran_at < timedelta(seconds=1)  # to the second
    assert next_run.hour % 6 == next_run.minute == next_run.second == 0
    assert timedelta(0) < next_run - ran_at <= timedelta(hours=6)
    assert (health["status"], health["scheduler"]["running"]) == ("ok", True)


def test_a_failing_run_is_logged_and_the_next_one_runs(fixture_db, caplog):
    failing_once = patch.object(main.log, "info", side_effect=[RuntimeError("no log")] + [None] * 999)  # fmt: skip
    every_second = {"HEARTBEAT_INTERVAL_SECONDS": "1"}
    with failing_once, caplog.at_level(logging.INFO), serve(fixture_db, **every_second) as client:  # fmt: skip
        wait_until(lambda: client.get("/health").json()["scheduler"]["last_run"])
    [failure] = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert failure.exc_info[1].args == ("no log",)  # APScheduler logged it, and went on


# The data file: only read, and followed when it is replaced or removed ----------------


def test_a_file_missing_at_start_up_stops_it_saying_how_to_create_it(tmp_path):
    path = tmp_path / "ads.db"
    with pytest.raises(RuntimeError) as stopped, serve(path):
        pass
    assert (str(stopped.value), path.exists()) == (MISSING.format(path), False)


def test_a_file_removed_or_replaced_by_a_bad_one_is_a_503_until_one_is_back(db_path):
    good, bad = db_path.read_bytes(), db_path.with_name("bad.db")
    with sqlite3.connect(bad) as db:
        db.execute("CREATE TABLE dim_date (date_id, date_value)")
    with serve(db_path) as client:
        db_path.unlink()
        missing = [client.get(url) for url in ("/metrics", "/dimensions", "/health")]
        assert not db_path.exists()
        db_path.write_bytes(b"not a database" * 1000)
        unreadable = client.get("/health")
        os.replace(bad, db_path)
        no_schema = client.get("/metrics")
        db_path.write_bytes(good)
        check_page(client.get("/metrics?group_by=week"), {"group_by": "week"})
    for answer in missing:
        assert (answer.status_code, answer.json()) == (503, {"detail": MISSING.format(db_path)})  # fmt: skip
    advice = "point ADS_DB at an ad-metrics file"
    reason = f"database {db_path} cannot be read (file is not a database); {advice}"
    assert (unreadable.status_code, unreadable.json()) == (503, {"detail": reason})
    reason = f"database {db_path} cannot be read (no such table: fact_ad_metrics_daily)"
    assert no_schema.json() == {"detail": f"{reason}; {advice}"}


def test_a_file_locked_past_the_time_limit_is_a_503_to_try_again(db_path):
    locker = sqlite3.connect(db_path, isolation_level=None)  # another process writes
    with serve(db_path, QUERY_TIMEOUT_SECONDS="0.2") as client:
        locker.execute("BEGIN EXCLUSIVE")
        locked = client.get("/metrics")
        locker.execute("ROLLBACK")
        assert client.get("/metrics").status_code == 200
    reason = f"database {db_path} cannot be read (database is locked); try again"
    assert (locked.status_code, locked.json()) == (503, {"detail": reason})


def test_seed_force_over_the_served_file_is_read_by_the_next_request(tmp_path):
    path = tmp_path / "ads.db"
    seed.seed(path, days=5, density=0.05)
    with serve(path) as client:
        assert client.get("/dimensions").json()["date"]["last"] == "2025-01-05"
        args = ["--db", str(path), "--days", "9", "--density", "0.05", "--force"]
        assert seed.main(args) == 0
        assert client.get("/dimensions").json()["date"]["last"] == "2025-01-09"
        assert client.get("/metrics?group_by=date").json()["paging"]["total_rows"] == 9
    assert os.listdir(tmp_path) == ["ads.db"]


def test_a_file_replaced_under_load_is_followed_with_no_error(tmp_path):
    path = tmp_path / "ads.db"
    copies = [build_db(tmp_path / f"{v}.db", v) for v in VARIANTS[:2]]  # the same rows
    shutil.copy(copies[0], path)

    async def load() -> list:
        answers, done = [], asyncio.Event()
        transport = httpx.ASGITransport(app=main.app)
        http = httpx.AsyncClient(transport=transport, base_url="http://test")

        async def ask():
            while not done.is_set():
                answers.append(await http.get("/metrics?group_by=month"))

        async with main.lifespan(main.app), http:
            clients = [asyncio.create_task(ask()) for _ in range(8)]
            for i in range(10):  # a new file renamed over the served one, ten times
                await asyncio.to_thread(shutil.copy, copies[i % 2], tmp_path / "new.db")
                os.replace(tmp_path / "new.db", path)
                await asyncio.sleep(0.05)
            done.set()
            await asyncio.gather(*clients)
        return answers

    with patch.object(main, "settings", settings_for(path)):
        answers = asyncio.run(load())
    assert len(answers) > 20 and {answer.status_code for answer in answers} == {200}
    totals = reference({})[1]
    for answer in answers:
        assert_rows_equal([answer.json()["totals"]], [totals])


def test_a_query_past_the_time_limit_is_stopped_and_blocks_no_other_request(tmp_path):
    path = build_db(tmp_path / "ads.db")  # its fact table a view of 200 million rows:
    columns = ", ".join(f"1 AS {column}" for column in FACT_COLUMNS)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE fact_ad_metrics_daily")
        db.execute(f"CREATE VIEW fact_ad_metrics_daily AS WITH RECURSIVE n(i) AS (SELECT 1"
                   f" UNION ALL SELECT i + 1 FROM n WHERE i < 2e8) SELECT {columns} FROM n")  # fmt: skip

    async def ask() -> tuple:
        transport = httpx.ASGITransport(app=main.app)
        async with main.lifespan(main.app), httpx.AsyncClient(transport=transport, base_url="http://test") as http:  # fmt: skip
            slow = asyncio.create_task(http.get("/metrics?group_by=region"))
            await asyncio.sleep(0.1)
            others = [await http.get(url) for url in ("/health", "/dimensions")]
            return others, slow.done(), await asyncio.wait_for(slow, 10)

    threads = threading.active_count()
    with patch.object(main, "settings", settings_for(path, QUERY_TIMEOUT_SECONDS="1")):
        began = time.monotonic()
        others, slow_was_done, stopped = asyncio.run(ask())
        assert 1 <= time.monotonic() - began < 10
    assert [answer.status_code for answer in others] == [200, 200] and not slow_was_done
    wait_until(lambda: threading.active_count() <= threads)  # its statement ended
    advice = "narrow the dates, add filters or group by fewer fields"
    message = f"the query took over 1 s and was stopped; {advice}"
    assert (stopped.status_code, stopped.json()) == (503, {"detail": message})


# Start-up, and python main.py ---------------------------------------------------------


def test_three_workers_start_on_wal_and_rollback_files_and_never_write(tmp_path):
    servers, paths, hashes = [], [], []
    for mode in ("wal", "delete"):
        paths.append(build_db(tmp_path / f"{mode}.db"))
        with sqlite3.connect(paths[-1]) as db:
            db.execute(f"PRAGMA journal_mode = {mode}")
        hashes.append(sha256(paths[-1]))
        log = tmp_path / f"{mode}.log"
        args = ("--workers", "3")
        servers.append(start(paths[-1], log, *args, HEARTBEAT_INTERVAL_SECONDS="1"))
    try:
        for _, url, log in servers:
            wait_until(lambda log=log: log.read_text().count("startup complete") == 3)
            for params in list(QUERIES.values())[:8]:
                assert httpx.get(f"{url}/metrics", params=params).status_code == 200
        for _, url, log in servers:  # each worker runs its own heartbeat, each second
            wait_until(lambda log=log: log.read_text().count(" the job ran at ") >= 9)
    finally:
        assert [stop(process) for process, _, _ in servers] == [0, 0]
    assert [sha256(path) for path in paths] == hashes
    assert all("Traceback" not in log.read_text() for _, _, log in servers)


def test_python_main_py_seeds_the_file_and_serves_the_readme_s_example(tmp_path):
    path, log = tmp_path / "new.db", tmp_path / "server.log"
    process, url, _ = start(path, log, command=[sys.executable, "main.py"])
    example = {"start_date": "2025-03-01", "end_date": "2025-03-31", "limit": "3",
               "region": "North America", "platform": "Instagram",
               "group_by": "placement", "sort": "-cost"}  # fmt: skip
    try:
        wait_until(lambda: probe(f"{url}/health"))
        [feed, *_] = httpx.get(f"{url}/metrics", params=example).json()["data"]
    finally:
        assert stop(process) in (0, -signal.SIGTERM)  # uvicorn ends as the signal asks
    db = sqlite3.connect(path)
    [(rows,)] = db.execute("SELECT count(*) FROM fact_ad_metrics_daily")
    assert f"seeded {rows:,} rows" in log.read_text()
    assert "Application shutdown complete" in log.read_text()
    [costliest] = db.execute(
        "SELECT placement_name, sum(impressions), round(sum(cost), 2)"
        " FROM fact_ad_metrics_daily NATURAL JOIN dim_date NATURAL JOIN dim_region"
        " NATURAL JOIN dim_platform NATURAL JOIN dim_placement"
        " WHERE date_value LIKE '2025-03-%' AND region_name = 'North America'"
        " AND platform_name = 'Instagram' GROUP BY 1 ORDER BY 3 DESC LIMIT 1"
    )
    assert (feed["placement"], feed["impressions"], feed["cost"]) == costliest


# The reference: the contract, read again, over the fixture's rows ---------------------

ORPHAN = 99  # an id in no dimension table (and 100, its twin's)
DIMS = {  # as main.DIMENSIONS, with the names by id
    "region": ("dim_region", "region_id", "region_name",
               {7: "Mike", 2: "Zulu", 5: "Alpha", 9: "Quebec"}),
    "age_group": ("dim_age_group", "age_id", "age_range", {4: "18-24", 1: "35-44"}),
    "gender": ("dim_gender", "gender_id", "gender_name", {2: "female", 1: "Male"}),
    "platform": ("dim_platform", "platform_id", "platform_name",
                 {9: "Facebook", 3: "Instagram"}),
    "placement": ("dim_placement", "placement_id", "placement_name",
                  {1: "Stories", 2: "Feed", 6: "Reels", 4: 'Native, Banner & "Interstitial"'}),
    "device_type": ("dim_device_type", "device_type_id", "device_type_name",
                    {8: "Mobile", 6: "Tablet"}),
}  # fmt: skip
DAYS = [(date(2025, 1, 27) + timedelta(days=i)).isoformat() for i in range(20)]
SHUFFLED_IDS = dict(zip(DAYS, random.Random(1).sample(range(100, 200), len(DAYS))))
GRAIN = ["date", *DIMS]
COUNTS = ["impressions", "clicks", "cost", "conversions", "likes"]
RATIOS = ["ctr", "cpc", "cpm", "cpa", "conversion_rate"]
FACT_COLUMNS = ["date_id", *(dim[1] for dim in DIMS.values()), *COUNTS]


def make_facts() -> list[dict]:
    """The fixture's rows: ids, a day, counts (cost in cents, a few refunds); a few rows
    have an id in no dimension table, or a date id not in dim_date."""
    rng = random.Random(42)
    ids = [[i for i in names if names[i] != "Quebec"] for *_, names in DIMS.values()]
    facts = [dict(zip(DIMS, combo), day=day, date_id=SHUFFLED_IDS[day])
             for day, combo in product(DAYS, product(*ids)) if rng.random() <= 0.3]  # fmt: skip
    for i, orphan in enumerate([*DIMS, "day"] * 3):
        unknown = {orphan: ORPHAN} if orphan in DIMS else {"day": None, "date_id": 999 + i % 2}  # fmt: skip
        facts.append(facts[i * 37] | unknown)
    for row in facts:
        imps = rng.choice([0, rng.randint(1, 40), rng.randint(100, 20000)])
        if row["day"] == "2025-02-03" and row["region"] == 7:  # a group of zeros
            imps = 0
        clicks = rng.randint(0, imps // 15) if imps else 0
        cost = rng.randint(1, 2 * imps) * rng.choice([1] * 30 + [-1]) if imps else 0
        row |= {"impressions": imps, "clicks": clicks, "cost": cost,
                "conversions": rng.randint(0, clicks // 4) if clicks else 0,
                "likes": rng.randint(0, imps // 50)}  # fmt: skip
    twin = next(row for row in facts if row["region"] == ORPHAN)  # its labels, too
    return [*facts, twin | {"region": ORPHAN + 1}]


FACTS = make_facts()


def build_db(path: Path, variant: str = "plain") -> Path:
    """Write the fixture as someone else's file might hold it, in a variant that a file
    with the schema may take."""
    dated = variant == "date ids in date order"
    date_ids = dict(zip(DAYS, range(1, 21))) if dated else SHUFFLED_IDS
    key = "" if variant == "no unique key" else " PRIMARY KEY"
    count = "REAL" if variant == "counts stored as reals" else "INTEGER"
    odd = variant == "extra columns named like ours"  # a fiscal calendar, say
    db = sqlite3.connect(path)
    extra = ", month TEXT DEFAULT 'P01', week INTEGER, cost REAL" if odd else ""
    db.execute(f"CREATE TABLE dim_date (date_id INTEGER{key}, date_value TEXT{extra})")
    dates = [(i, day) for day, i in date_ids.items()]
    db.executemany("INSERT INTO dim_date (date_id, date_value) VALUES (?, ?)", dates)
    extra = ", cost REAL DEFAULT 5, impressions INTEGER, date_id" if odd else ""
    for table, id_column, name_column, names in DIMS.values():
        columns = f"{id_column} INTEGER{key}, {name_column} TEXT{extra}"
        db.execute(f"CREATE TABLE {table} ({columns})")
        insert = f"INSERT INTO {table} ({id_column}, {name_column}) VALUES (?, ?)"
        db.executemany(insert, names.items())
    ids = FACT_COLUMNS[:7]
    columns = [f"{c} INTEGER" for c in ids] + [f"{c} {count}" for c in COUNTS]
    unique = "" if variant == "no unique key" else f", PRIMARY KEY ({', '.join(ids)})"
    db.execute(f"CREATE TABLE fact_ad_metrics_daily ({', '.join(columns)}{unique})")
    rows = [(date_ids.get(f["day"], f["date_id"]), *(f[d] for d in DIMS), f["impressions"],
             f["clicks"], f["cost"] / 100, f["conversions"], f["likes"]) for f in FACTS]  # fmt: skip
    db.executemany(f"INSERT INTO fact_ad_metrics_daily VALUES ({', '.join('?' * 12)})", rows)  # fmt: skip
    db.commit()
    db.close()
    return path


def label(fact: dict, field: str) -> str | None:
    if field in DIMS:
        return DIMS[field][3].get(fact[field])
    if fact["day"] is None:
        return None
    day = date.fromisoformat(fact["day"])
    monday = (day - timedelta(days=day.weekday())).isoformat()
    return {"date": fact["day"], "week": monday, "month": fact["day"][:7]}[field]


def rounded(numerator, denominator) -> float | None:
    """numerator / denominator to 6 decimals, exactly, half away from zero; None for x/0."""
    if denominator == 0:
        return None
    millionths = Fraction(numerator) / denominator * 10**6
    magnitude = math.floor(abs(millionths) + Fraction(1, 2))
    return float(Fraction(magnitude if millionths >= 0 else -magnitude, 10**6))


def metrics(s: dict) -> dict:
    cost = Fraction(s["cost"], 100)
    return {"impressions": s["impressions"], "clicks": s["clicks"], "cost": float(cost),
            "conversions": s["conversions"], "likes": s["likes"],
            "ctr": rounded(s["clicks"], s["impressions"]), "cpc": rounded(cost, s["clicks"]),
            "cpm": rounded(1000 * cost, s["impressions"]), "cpa": rounded(cost, s["conversions"]),
            "conversion_rate": rounded(s["conversions"], s["clicks"])}  # fmt: skip


def reference(params: dict) -> tuple[list[dict], dict]:
    """Answer a /metrics query as the contract says: every row, in order, and totals."""
    wanted = {
        d: [v.casefold() for v in as_list(params[d])] for d in DIMS if d in params
    }
    start, end = params.get("start_date", "0"), params.get("end_date", "9")
    ranged = "start_date" in params or "end_date" in params  # holds no unknown date

    def matches(f) -> bool:
        if (ranged and f["day"] is None) or not start <= (f["day"] or "0") <= end:
            return False
        return all((label(f, d) or "").casefold() in names for d, names in wanted.items())  # fmt: skip

    rows = [f for f in FACTS if matches(f)]
    fields = as_list(params.get("group_by", GRAIN))
    groups = {}
    for i, f in enumerate(rows):  # a group of labels; in the grain, each row its own
        key = i if set(fields) == set(GRAIN) else tuple(label(f, x) for x in fields)
        group = groups.setdefault(key, dict.fromkeys(COUNTS, 0) | {"fact": f})
        for count in COUNTS:
            group[count] += f[count]
    out = [
        {x: label(g["fact"], x) for x in fields} | metrics(g) for g in groups.values()
    ]
    sort = as_list(params.get("sort", []))
    for item in reversed(sort + [f for f in fields if f not in [s.lstrip("-") for s in sort]]):  # fmt: skip
        field, descending = item.lstrip("-"), item.startswith("-")
        present = [row for row in out if row[field] is not None]
        present.sort(
            key=lambda row: row[field], reverse=descending
        )  # stable either way
        out = present + [row for row in out if row[field] is None]  # null last
    return out, metrics({count: sum(f[count] for f in rows) for count in COUNTS})


def check_page(response, params: dict) -> None:
    """Assert that a /metrics answer is the reference's page for these parameters."""
    assert response.status_code == 200, response.text
    rows, totals = reference(params)
    limit, offset = int(params.get("limit", 100)), int(params.get("offset", 0))
    body = response.json()
    assert_rows_equal(body["data"], rows[offset : offset + limit])
    assert_rows_equal([body["totals"]], [totals])
    paging = {"limit": limit, "offset": offset, "total_rows": len(rows)}
    assert body["paging"] == paging | {"next": body["paging"]["next"]}
    assert (body["paging"]["next"] is None) == (offset + limit >= len(rows))


def assert_rows_equal(rows: list[dict], expected: list[dict]) -> None:
    """The same rows, each its group_by fields then the ten metrics; a ratio to 6 places
    and within 2e-6 of the reference's exact one, every other value the same."""
    assert [set(row) for row in rows] == [set(row) for row in expected]
    for row, want in zip(rows, expected):
        assert list(row)[-10:] == [*COUNTS, *RATIOS]
        for key, value in want.items():
            if key in RATIOS and None not in (value, row[key]):
                assert abs(row[key] - value) <= 2e-6 and round(row[key], 6) == row[key]
            else:
                assert row[key] == value, (key, row, want)


def as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


# Generated queries ----------------------------------------------------------------------

VALID = st.fixed_dictionaries(  # a well-formed query: any of the parameters
    {},
    optional={
        "start_date": st.dates(date(2025, 1, 1), date(2025, 1, 31)).map(date.isoformat),
        "end_date": st.dates(date(2025, 2, 1), date(2025, 3, 1)).map(date.isoformat),
        **{dim: st.lists(st.sampled_from(list(names.values())).map(str.upper),
                         min_size=1, max_size=2) for dim, (*_, names) in DIMS.items()},
        "group_by": st.tuples(st.sampled_from([[], ["date"], ["week"], ["month"]]),
                              st.lists(st.sampled_from(list(DIMS)), min_size=1,
                                       max_size=3, unique=True)).map(lambda t: t[0] + t[1]),
        "sort": st.lists(st.sampled_from([*COUNTS, *RATIOS]), min_size=1, max_size=2,
                         unique=True).map(lambda fs: ["-" * (len(f) % 2) + f for f in fs]),
        "limit": st.integers(1, 1000).map(str),
        "offset": st.one_of(st.integers(0, 3000), st.just(2**63 - 1)).map(str),
    },
)  # fmt: skip
ODD = st.tuples(  # mostly known names, so that odd values meet their checks
    st.sampled_from([*main.MetricsQuery.model_fields] * 3 + ["", "Offset", "limit "])
    | st.text(max_size=8),
    st.sampled_from(["", "-", "--cost", "0000-01-01", "9" * 25, "%", "' OR 1=1 --", "x" * 5000,
                     "-1", "0", "1001", str(2**63), str(10**30), "2025-02-30", "1e3"])
    | st.text(max_size=30) | st.integers(-(2**70), 2**70).map(str),
)  # fmt: skip


# Helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fixture_db(tmp_path_factory) -> Path:
    """The fixture file, for the tests that only read it; after them, it is unchanged."""
    path = build_db(tmp_path_factory.mktemp("fixture") / "ads.db")
    before = sha256(path)
    yield path
    assert sha256(path) == before


@pytest.fixture
def db_path(tmp_path) -> Path:
    return build_db(tmp_path / "ads.db")


def settings_for(path: Path, **env: str) -> main.Settings:
    return main.Settings.from_env({"ADS_DB": str(path), **env})


@contextmanager
def serve(path: Path, **env: str):
    """The service on the file at path, in this process, with these settings."""
    with patch.object(main, "settings", settings_for(path, **env)), TestClient(main.app) as client:  # fmt: skip
        yield client


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_until(condition, timeout: float = 30.0):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return result


def start(path: Path, log: Path, *args: str, command=None, **env: str):
    """Start `uvicorn main:app` (or `command`) on the file at path, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = command or [sys.executable, "-m", "uvicorn", "main:app", "--port", port, *args]  # fmt: skip
    env = os.environ | {"ADS_DB": str(path), "PORT": port, **env}
    output = {"stdout": log.open("w"), "stderr": subprocess.STDOUT}
    process = subprocess.Popen(command, cwd=HERE, env=env, **output)
    return process, f"http://127.0.0.1:{port}", log


def stop(process: subprocess.Popen) -> int:
    """SIGTERM a server; kill it if it has not stopped in 10 s. Its exit status."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    finally:
        process.kill()


def probe(url: str):
    try:
        return httpx.get(url)
    except httpx.TransportError:
        return None
