"""Benchmark the Ad Metrics API over HTTP against SQLite's own speed on the same file.

    python bench/bench.py [--service DIR] [--against DIR] [--json FILE] [--cache DIR]
                          [--soak SECONDS]

It seeds the databases with seed.py, all at one density, so that a query on a day or a
month touches the same rows whatever the table's size: 1M+ rows (365 days, built afresh
to time the seed), and about 100k (35 days) and 5M+ (1,826 days) for scaling, kept in
--cache between runs. The service runs as a real `uvicorn main:app` process from
--service (default: this repository), one worker, no access log; the client talks to
it over loopback with keep-alive connections. Nothing here imports main.py, so the same
run can measure another version of the service.

Each query's floor is the fastest plain-sqlite3 computation of the same answer (rows,
totals and total_rows) in this process, on the same file, checked against the API's
answer (its ratios to within 2e-6) before it is timed. Then: throughput against a
trivial endpoint, a light query beside heavy ones, a CSV export against sqlite3 and the
csv module, a 304 against the full answer, the file replaced under load, a soak,
scaling, and the server's memory.
With --against DIR, it first times each query on both services, on one file, their
requests alternated, so that the ratio of the two is measured in the same moments.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import seed  # the data, not the service

DENSITY = 0.45
QUERIES = {  # name -> (what it is, query string)
    "Q1": ("a page of raw rows: one month", "start_date=2025-01-01&end_date=2025-01-31&limit=100"),
    "Q2": ("a breakdown: by platform, all dates", "group_by=platform"),
    "Q3": ("a time series: by date, 1 platform, 1 region",
           "group_by=date&platform=Instagram&region=North%20America"),
    "Q4": ("top 10 region-placements by cost, a quarter",
           "group_by=region,placement&sort=-cost&limit=10&start_date=2025-01-01&end_date=2025-03-31"),
    "Q5": ("weekly: by week and device, all dates", "group_by=week,device_type"),
    "Q6": ("narrow: one day, one region", "start_date=2025-01-15&end_date=2025-01-15&region=Latin%20America&limit=50"),
    "Q7": ("a deep page: offset 500,000", "offset=500000"),
}  # fmt: skip
BAD = ["region=Atlantis", "limit=0", "start_date=2025-02-30", "group_by=date,week",
       "sort=region&group_by=platform", "colour=red", "region=x%27%20OR%20%271%27%3D%271"]  # fmt: skip
DIMENSIONS = {  # API name -> (id column, table, name column)
    "region": ("region_id", "dim_region", "region_name"),
    "age_group": ("age_id", "dim_age_group", "age_range"),
    "gender": ("gender_id", "dim_gender", "gender_name"),
    "platform": ("platform_id", "dim_platform", "platform_name"),
    "placement": ("placement_id", "dim_placement", "placement_name"),
    "device_type": ("device_type_id", "dim_device_type", "device_type_name"),
}
KEY = "date_id, region_id, age_id, gender_id, platform_id, placement_id, device_type_id"
SUMS = "sum(impressions), sum(clicks), sum(cost), sum(conversions), sum(likes)"
RATIOS = {  # name -> how the service computes it from a group's sums
    "ctr": "round(1.0 * clicks / nullif(impressions, 0), 6)",
    "cpc": "round(1.0 * cost / nullif(clicks, 0), 6)",
    "cpm": "round(1000.0 * cost / nullif(impressions, 0), 6)",
    "cpa": "round(1.0 * cost / nullif(conversions, 0), 6)",
    "conversion_rate": "round(1.0 * conversions / nullif(clicks, 0), 6)",
}


# The client ----------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection that GETs paths and times the answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = self.writer = None

    async def get(self, path: str, headers: str = "") -> tuple[int, bytes, float]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port
            )
        began = time.perf_counter()
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\n{headers}\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        if status == 304:
            body = b""
        elif b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await self.reader.readexactly(length)
        else:  # chunked
            body = b""
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        return status, body, time.perf_counter() - began

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.reader = self.writer = None


async def sequential(
    port: int, path: str, n: int, warmup: int = 3, headers: str = ""
) -> list[float]:
    """Time n requests, one after the other, on one connection."""
    connection, times = Connection(port), []
    for i in range(warmup + n):
        status, body, seconds = await connection.get(path, headers)
        assert status in (200, 304), (path, status, body[:200])
        if i >= warmup:
            times.append(seconds)
    connection.close()
    return times


async def hammer(port: int, paths: list[str], clients: int, seconds: float) -> dict:
    """Loop `clients` connections over `paths`, picked at random, for `seconds`."""
    stop = time.perf_counter() + seconds
    result = {"latencies": [], "statuses": {}, "errors": 0, "by_path": {}}
    failures = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)

    async def loop(rng: random.Random) -> None:
        connection = Connection(port)
        while time.perf_counter() < stop:
            path = rng.choice(paths)
            try:
                status, _, took = await connection.get(path)
            except failures:
                result["errors"] += 1
                connection.close()
                continue
            result["latencies"].append(took)
            result["by_path"].setdefault(path, []).append(took)
            result["statuses"][status] = result["statuses"].get(status, 0) + 1
        connection.close()

    await asyncio.gather(*(loop(random.Random(i)) for i in range(clients)))
    return result


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


# The server ------------------------------------------------------------------------------


class Server:
    """`uvicorn main:app` from the service's directory on a database: one worker."""

    def __init__(self, service: Path, db: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(self.port),
                   "--no-access-log", "--log-level", "warning"]  # fmt: skip
        # The heartbeat's file beside the database, never in the service's repository.
        heartbeat = db.absolute().with_name(f"{db.stem}-heartbeat.db")
        env = {**os.environ, "ADS_DB": str(db), "HEARTBEAT_DB": str(heartbeat),
               "LOG_LEVEL": "WARNING"}  # fmt: skip
        self.process = subprocess.Popen(command, cwd=service, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server on {db} did not start") from None
                time.sleep(0.05)

    def memory(self, field: str = "VmRSS") -> float:
        """The server's resident memory (VmRSS) or its peak (VmHWM), in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise LookupError(field)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


# The engine floor -------------------------------------------------------------------------


def finish(*sums) -> dict:
    """The ten output metrics from a group's sums of impressions, clicks, cost,
    conversions and likes, as the service's SQL has them: a null sum is 0, the cost
    rounded to cents, each ratio to 6 decimals from the raw sums."""
    impressions, clicks, cost, conversions, likes = (s or 0 for s in sums)

    def ratio(numerator: float, denominator: int) -> float | None:
        return round(numerator / denominator, 6) if denominator else None

    return {"impressions": impressions, "clicks": clicks, "cost": round(cost, 2),
            "conversions": conversions, "likes": likes, "ctr": ratio(clicks, impressions),
            "cpc": ratio(cost, clicks), "cpm": ratio(1000.0 * cost, impressions),
            "cpa": ratio(cost, conversions), "conversion_rate": ratio(conversions, clicks)}  # fmt: skip


def agrees(floor, api, field: str = "") -> bool:
    """Whether a floor's answer is the API's: the same keys, the rows in the same
    order, ratios within 2e-6 (SQLite and Python may round a half apart), the rest
    exactly."""
    if isinstance(floor, dict):
        return (
            isinstance(api, dict)
            and floor.keys() == api.keys()
            and all(agrees(floor[k], api[k], k) for k in floor)
        )
    if isinstance(floor, list):
        return (
            isinstance(api, list)
            and len(floor) == len(api)
            and all(map(agrees, floor, api))
        )
    if field in RATIOS and floor is not None and api is not None:
        return abs(floor - api) <= 2e-6
    return floor == api


class Floors:
    """For each query, SQL written for it alone, finished in Python: the quickest way
    to the same answer found. Like the service, it reads the names once."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.names = {
            dim: dict(db.execute(f"SELECT {c}, {n} FROM {t}"))
            for dim, (c, t, n) in DIMENSIONS.items()
        }
        self.ids = {
            d: {v: k for k, v in names.items()} for d, names in self.names.items()
        }
        self.dates = dict(db.execute("SELECT date_id, date_value FROM dim_date"))
        self.date_id = {v: k for k, v in self.dates.items()}
        self.monday = {i: (date.fromisoformat(v) - timedelta(days=date.fromisoformat(v).weekday())).isoformat()
                       for i, v in self.dates.items()}  # fmt: skip

    def fact_rows(self, where: str, params: list, limit: int, offset: int = 0) -> dict:
        """A page of fact rows in key order, with the totals over all that match."""
        page = self.db.execute(
            f"SELECT {KEY}, impressions, clicks, cost, conversions, likes "
            f"FROM fact_ad_metrics_daily WHERE {where} ORDER BY {KEY} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        count, *sums = self.db.execute(
            f"SELECT count(*), {SUMS} FROM fact_ad_metrics_daily WHERE {where}", params
        ).fetchone()
        names = [self.names[dim] for dim in DIMENSIONS]
        data = [{"date": self.dates[row[0]], **{dim: by_id[i] for dim, by_id, i in zip(DIMENSIONS, names, row[1:7])},
                 **finish(*row[7:])} for row in page]  # fmt: skip
        return {"data": data, "totals": finish(*sums), "total_rows": count}

    def grouped(self, groups: list[tuple[dict, list]], order, limit: int) -> dict:
        """Finish, sort and cut groups given as (labels, sums)."""
        rows = sorted(
            ({**labels, **finish(*sums)} for labels, sums in groups), key=order
        )
        totals = finish(*(sum(sums[i] for _, sums in groups) for i in range(5)))
        return {"data": rows[:limit], "totals": totals, "total_rows": len(rows)}

    def q1(self) -> dict:
        return self.fact_rows(
            "date_id BETWEEN ? AND ?",
            [self.date_id["2025-01-01"], self.date_id["2025-01-31"]],
            100,
        )

    def q2(self) -> dict:
        rows = self.db.execute(
            f"SELECT platform_id, {SUMS} FROM fact_ad_metrics_daily GROUP BY 1"
        )
        groups = [({"platform": self.names["platform"][p]}, s) for p, *s in rows]
        return self.grouped(groups, lambda r: self.ids["platform"][r["platform"]], 100)

    def q3(self) -> dict:
        rows = self.db.execute(
            f"SELECT date_id, {SUMS} FROM fact_ad_metrics_daily WHERE platform_id = ? AND region_id = ? GROUP BY 1",
            [self.ids["platform"]["Instagram"], self.ids["region"]["North America"]],
        )
        return self.grouped(
            [({"date": self.dates[d]}, s) for d, *s in rows], lambda r: r["date"], 100
        )

    def q4(self) -> dict:
        rows = self.db.execute(
            f"SELECT region_id, placement_id, {SUMS} FROM fact_ad_metrics_daily WHERE date_id BETWEEN ? AND ? GROUP BY 1, 2",
            [self.date_id["2025-01-01"], self.date_id["2025-03-31"]],
        )
        region, placement, ids = self.names["region"], self.names["placement"], self.ids
        groups = [
            ({"region": region[r], "placement": placement[p]}, s) for r, p, *s in rows
        ]
        return self.grouped(
            groups,
            lambda r: (
                -r["cost"],
                ids["region"][r["region"]],
                ids["placement"][r["placement"]],
            ),
            10,
        )

    def q5(self) -> dict:
        rows = self.db.execute(
            f"SELECT date_id, device_type_id, {SUMS} FROM fact_ad_metrics_daily GROUP BY 1, 2"
        )
        weeks: dict[tuple, list] = {}
        for day, device, *sums in rows:
            week = weeks.setdefault((self.monday[day], device), [0, 0, 0.0, 0, 0])
            for i, value in enumerate(sums):
                week[i] += value
        name, ids = self.names["device_type"], self.ids["device_type"]
        groups = [
            ({"week": w, "device_type": name[d]}, s) for (w, d), s in weeks.items()
        ]
        return self.grouped(groups, lambda r: (r["week"], ids[r["device_type"]]), 100)

    def q6(self) -> dict:
        return self.fact_rows(
            "date_id = ? AND region_id = ?",
            [self.date_id["2025-01-15"], self.ids["region"]["Latin America"]],
            50,
        )

    def q7(self) -> dict:
        return self.fact_rows("1", [], 100, 500_000)

    def export(self) -> bytes:
        """The default breakdown, every fact row, as CSV with its names: sqlite3 and
        the csv module, each number rounded as the service does and written as SQLite
        writes it (CAST AS TEXT: 0.493256, where Python would write 0.49325600000000003;
        null: an empty field)."""
        names = ", ".join(
            f"(SELECT {n} FROM {t} WHERE {t}.{c} = f.{c})"
            for c, t, n in DIMENSIONS.values()
        )
        numbers = ["impressions", "clicks", "round(cost, 2)", "conversions", "likes",
                   *RATIOS.values()]  # fmt: skip
        sql = (f"SELECT (SELECT date_value FROM dim_date WHERE dim_date.date_id = f.date_id), {names}, "
               f"{', '.join(f'CAST({n} AS TEXT)' for n in numbers)} "
               f"FROM fact_ad_metrics_daily AS f ORDER BY {KEY}")  # fmt: skip
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["date", *DIMENSIONS, "impressions", "clicks", "cost", "conversions", "likes",
                         *RATIOS])  # fmt: skip
        cursor = self.db.execute(sql)
        while rows := cursor.fetchmany(1000):
            writer.writerows(rows)
        return out.getvalue().encode()


def timed(fn, n: int = 30) -> list[float]:
    """Run fn once to warm up, then n times; return the times."""
    fn()
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


# The run -----------------------------------------------------------------------------------


def build(path: Path, days: int, cached: bool) -> tuple[int, float]:
    """Seed `path` (unless cached and there); return its rows and the seconds taken."""
    if cached and path.exists():
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM fact_ad_metrics_daily").fetchone()[
                0
            ], 0.0
    path.unlink(missing_ok=True)
    began = time.perf_counter()
    rows = seed.seed(path, days=days, density=DENSITY)
    return rows, time.perf_counter() - began


async def latencies(server: Server, db_path: Path) -> dict:
    """Each query's API latency, its engine floor, and their ratio."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    floors, figures = Floors(db), {}
    print(f"\n{'':50} API p50   API p95  floor p50  API/floor")
    for name, (what, query) in QUERIES.items():
        path = f"/metrics?{query}"
        api = await sequential(server.port, path, 30)
        _, body, _ = await Connection(server.port).get(path)
        answer = json.loads(body)
        floor_fn = getattr(floors, name.lower())
        hand = floor_fn()
        assert agrees([hand["data"], hand["totals"], hand["total_rows"]],
                      [answer["data"], answer["totals"], answer["paging"]["total_rows"]]), name  # fmt: skip
        floor = timed(floor_fn)
        p50, p95, f50 = (
            statistics.median(api),
            percentile(api, 95),
            statistics.median(floor),
        )
        figures[name] = {"query": query, "api_p50_ms": p50 * 1e3, "api_p95_ms": p95 * 1e3,
                         "floor_p50_ms": f50 * 1e3, "ratio": p50 / f50}  # fmt: skip
        print(
            f"{name} {what:47} {p50 * 1e3:7.2f}ms {p95 * 1e3:7.2f}ms {f50 * 1e3:8.2f}ms {p50 / f50:8.2f}x"
        )
    db.close()
    return figures


async def throughput(server: Server) -> dict:
    """Q6 against /dimensions, 16 clients, alternated three times (the host is noisy)."""
    q6 = f"/metrics?{QUERIES['Q6'][1]}"
    ratios, rates = [], []
    for _ in range(3):
        trivial = await hammer(server.port, ["/dimensions"], 16, 10 / 3)
        narrow = await hammer(server.port, [q6], 16, 10 / 3)
        assert set(trivial["statuses"]) == set(narrow["statuses"]) == {200}
        rates.append((len(trivial["latencies"]) * 0.3, len(narrow["latencies"]) * 0.3))
        ratios.append(len(narrow["latencies"]) / len(trivial["latencies"]))
    q6_rate = statistics.median(n for _, n in rates)
    print(f"\nQ6 throughput, 16 clients: {q6_rate:,.0f} req/s, {statistics.median(ratios):.1%} of "
          f"/dimensions' (runs: {', '.join(f'{n:,.0f} vs {t:,.0f} req/s' for t, n in rates)})")  # fmt: skip
    return {
        "q6_req_per_s": q6_rate,
        "q6_vs_trivial": statistics.median(ratios),
        "req_per_s": rates,
    }


async def isolation(server: Server, idle_p95_ms: float) -> dict:
    """Q6's p95 while four clients loop on Q2, against its idle p95."""
    heavy = asyncio.ensure_future(
        hammer(server.port, [f"/metrics?{QUERIES['Q2'][1]}"], 4, 14)
    )
    await asyncio.sleep(1)
    times = await sequential(server.port, f"/metrics?{QUERIES['Q6'][1]}", 100, 0)
    await heavy
    busy = percentile(times, 95) * 1e3
    print(
        f"Q6 p95 while 4 clients loop on Q2: {busy:.2f} ms, {busy / idle_p95_ms:.1f}x its idle p95 of {idle_p95_ms:.2f} ms"
    )
    return {
        "idle_p95_ms": idle_p95_ms,
        "beside_q2_p95_ms": busy,
        "ratio": busy / idle_p95_ms,
    }


async def export(server: Server, db_path: Path) -> dict | None:
    """The whole default breakdown as CSV: its time against sqlite3 and the csv module
    writing the same rows, the first byte's time, and the server's peak memory."""
    connection = Connection(server.port)
    status, _, _ = await connection.get("/metrics?format=csv&limit=1")
    connection.close()
    if status != 200:
        print("\nCSV export: not supported by this service")
        return None
    floor_db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    expected = Floors(floor_db).export()
    floor = statistics.median(timed(lambda: Floors(floor_db).export(), 3))
    times, firsts = [], []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        began = time.perf_counter()
        writer.write(
            b"GET /metrics?format=csv HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        )
        body = await reader.read(1)
        firsts.append(time.perf_counter() - began)
        body += await reader.read()
        times.append(time.perf_counter() - began)
        writer.close()
    _, _, chunked = body.partition(b"\r\n\r\n")
    data, rest = b"", chunked
    while (size := int(rest.split(b"\r\n", 1)[0], 16)) != 0:
        rest = rest.split(b"\r\n", 1)[1]
        data, rest = data + rest[:size], rest[size + 2 :]
    assert data == expected, "the export differs from sqlite3's"
    took, first = statistics.median(times), statistics.median(firsts)
    figures = {"rows": data.count(b"\r\n") - 1, "mb": len(data) / 2**20, "api_s": took, "floor_s": floor,
               "ratio": took / floor, "first_byte_s": first, "peak_rss_mb": server.memory("VmHWM")}  # fmt: skip
    print(f"\nCSV export of {figures['rows']:,} rows ({figures['mb']:.0f} MB): {took:.2f} s against "
          f"{floor:.2f} s for sqlite3 + csv, {took / floor:.2f}x; first byte {first * 1e3:.0f} ms; "
          f"server peak RSS {figures['peak_rss_mb']:.0f} MB")  # fmt: skip
    return figures


async def revalidation(server: Server) -> dict | None:
    """A 304 for the heaviest query, against its full answer and /dimensions."""
    path = f"/metrics?{QUERIES['Q5'][1]}"
    connection = Connection(server.port)
    await connection.get(path)
    connection.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = (await connection.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    connection.close()
    if "etag:" not in head:
        print("304: not supported by this service")
        return None
    tag = head.split("etag:")[1].split("\r\n")[0].strip()
    full = statistics.median(await sequential(server.port, path, 10))
    not_modified = statistics.median(
        await sequential(server.port, path, 200, headers=f"If-None-Match: {tag}\r\n")
    )
    trivial = statistics.median(await sequential(server.port, "/dimensions", 200))
    print(f"304 for Q5: {not_modified * 1e3:.2f} ms p50, against {full * 1e3:.1f} ms for the full answer "
          f"and {trivial * 1e3:.2f} ms for /dimensions")  # fmt: skip
    return {
        "full_ms": full * 1e3,
        "not_modified_ms": not_modified * 1e3,
        "trivial_ms": trivial * 1e3,
    }


def replaced_under_load(service: Path, work: Path, seconds: float = 15) -> dict:
    """The file replaced (os.replace) every 0.3 s while 12 clients ask."""
    import httpx

    path = work / "live.db"
    copies = [work / "copy0.db", work / "copy1.db"]
    for copy, days in zip(copies, (60, 61)):
        seed.seed(copy, days=days, density=0.1)
        # Rollback-journal files: renaming a new file over a live WAL file would pair it
        # with the old file's -wal, which SQLite documents as a way to corrupt it.
        sqlite3.connect(copy).execute("PRAGMA journal_mode = DELETE").connection.close()
    shutil.copy(copies[0], path)
    server = Server(service, path)
    statuses, errors, stop = [], [], threading.Event()
    url = f"http://127.0.0.1:{server.port}/metrics?group_by=week,region&limit=5"

    def ask() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    statuses.append(http.get(url).status_code)
                except httpx.HTTPError:
                    errors.append(1)

    clients = [threading.Thread(target=ask) for _ in range(12)]
    for thread in clients:
        thread.start()
    until, i = time.monotonic() + seconds, 0
    while time.monotonic() < until:
        shutil.copy(copies[i % 2], work / "next.db")
        os.replace(work / "next.db", path)
        i += 1
        time.sleep(0.3)
    stop.set()
    for thread in clients:
        thread.join()
    time.sleep(1)
    after = [httpx.get(url).status_code for _ in range(20)]
    server.stop()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    figures = {"replacements": i, "answers": counts, "connection_errors": len(errors),
               "share_503": counts.get(503, 0) / max(1, len(statuses)), "after": sorted(set(after))}  # fmt: skip
    print(f"file replaced {i} times in {seconds:g} s under 12 clients: {counts}, {len(errors)} connection "
          f"errors, {figures['share_503']:.1%} 503s; afterwards {figures['after']}")  # fmt: skip
    return figures


async def soak(server: Server, seconds: float) -> dict:
    """32 clients on a mix of the queries, bad requests and the other endpoints."""
    paths = [f"/metrics?{q}" for _, q in QUERIES.values()] + [
        f"/metrics?{q}" for q in BAD
    ]
    paths += ["/dimensions", "/health"] + [f"/metrics?{QUERIES['Q6'][1]}"] * 4
    await hammer(server.port, paths, 32, 5)
    rss_warm = server.memory()
    run = await hammer(server.port, paths, 32, seconds)
    rss_end = server.memory()
    statuses = dict(sorted(run["statuses"].items()))
    heavy = {f"/metrics?{QUERIES[q][1]}" for q in ("Q2", "Q4", "Q5", "Q7")}
    light = [t for p, ts in run["by_path"].items() if p not in heavy for t in ts]
    figures = {"seconds": seconds, "answers": sum(statuses.values()), "statuses": statuses,
               "connection_errors": run["errors"], "server_errors": sum(n for s, n in statuses.items() if s >= 500),
               "p99_light_ms": percentile(light, 99) * 1e3, "rss_after_warmup_mb": rss_warm, "rss_end_mb": rss_end}  # fmt: skip
    print(f"\nsoak: {seconds:g} s, 32 clients: {figures['answers']:,} answers {statuses}, "
          f"{figures['connection_errors']} connection errors, {figures['server_errors']} 5xx, light p99 "
          f"{figures['p99_light_ms']:.0f} ms; RSS {rss_warm:.0f} MB after warm-up, {rss_end:.0f} MB at the end")  # fmt: skip
    return figures


async def scaling(service: Path, small: Path, large: Path) -> dict:
    """Q1's and Q6's p50 on the 100k and the 5M database."""
    figures = {name: {} for name in ("Q1", "Q6")}
    for label, db in (("small", small), ("large", large)):
        server = Server(service, db)
        try:
            for name, by in figures.items():
                by[label + "_p50_ms"] = (
                    statistics.median(
                        await sequential(
                            server.port, f"/metrics?{QUERIES[name][1]}", 30
                        )
                    )
                    * 1e3
                )
        finally:
            server.stop()
    for name, by in figures.items():
        by["ratio"] = by["large_p50_ms"] / by["small_p50_ms"]
        print(
            f"{name} p50: {by['small_p50_ms']:.2f} ms at 100k rows, {by['large_p50_ms']:.2f} ms at 5M rows: {by['ratio']:.2f}x"
        )
    return figures


async def compare(service: Path, other: Path, db: Path, n: int = 30) -> dict:
    """Each query's p50 on this service against another's, on one file, the requests
    alternated between the two so that the host's noise falls on both alike."""
    servers = Server(other, db), Server(service, db)
    figures = {}
    try:
        connections = [Connection(server.port) for server in servers]
        print(f"\n{'':50} other p50  this p50  this/other")
        for name, (what, query) in QUERIES.items():
            times = ([], [])
            for i in range(3 + n):  # 3 to warm up; who goes first alternates too
                for k in (0, 1) if i % 2 else (1, 0):
                    status, _, took = await connections[k].get(f"/metrics?{query}")
                    assert status == 200, (name, status)
                    if i >= 3:
                        times[k].append(took)
            other_p50, this_p50 = map(statistics.median, times)
            figures[name] = {"other_p50_ms": other_p50 * 1e3, "this_p50_ms": this_p50 * 1e3,
                             "ratio": this_p50 / other_p50}  # fmt: skip
            print(f"{name} {what:47} {other_p50 * 1e3:7.2f}ms {this_p50 * 1e3:7.2f}ms "
                  f"{this_p50 / other_p50:8.3f}x")  # fmt: skip
        q6, rates = f"/metrics?{QUERIES['Q6'][1]}", ([], [])
        for i in range(6):  # Q6 throughput, 16 clients, each service in turn
            for k in (0, 1) if i % 2 else (1, 0):
                answers = await hammer(servers[k].port, [q6], 16, 10 / 3)
                assert set(answers["statuses"]) == {200}, answers["statuses"]
                rates[k].append(len(answers["latencies"]) * 0.3)
        other_rate, this_rate = map(statistics.median, rates)
        figures["Q6 throughput"] = {"other_req_per_s": other_rate, "this_req_per_s": this_rate,
                                    "ratio": this_rate / other_rate}  # fmt: skip
        print(f"Q6 throughput, 16 clients, six rounds each: {other_rate:,.0f} req/s against "
              f"{this_rate:,.0f} req/s this: {this_rate / other_rate:.3f}x")  # fmt: skip
    finally:
        for server in servers:
            server.stop()
    return figures


async def run(args: argparse.Namespace) -> dict:
    service, cache = Path(args.service).resolve(), Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ad-metrics-bench-"))
    rows, seconds = build(work / "1m.db", 365, cached=False)
    figures = {"service": str(service), "seed": {"rows": rows, "seconds": seconds}}
    print(
        f"service: {service}\nseed.py: {rows:,} rows in {seconds:.2f} s ({rows / seconds:,.0f} rows/s)"
    )
    small, large = cache / f"days35-{DENSITY}.db", cache / f"days1826-{DENSITY}.db"
    figures["scaling_rows"] = [
        build(small, 35, cached=True)[0],
        build(large, 1826, cached=True)[0],
    ]
    if args.against:
        other = Path(args.against).resolve()
        print(f"against: {other}")
        figures["against"] = await compare(service, other, work / "1m.db")
    server = Server(service, work / "1m.db")
    try:
        figures["queries"] = await latencies(server, work / "1m.db")
        figures["throughput"] = await throughput(server)
        figures["isolation"] = await isolation(
            server, figures["queries"]["Q6"]["api_p95_ms"]
        )
        figures["revalidation"] = await revalidation(server)
        figures["export"] = await export(server, work / "1m.db")
        figures["soak"] = await soak(server, args.soak)
        figures["peak_rss_mb"] = server.memory("VmHWM")
        print(f"server peak RSS over the run: {figures['peak_rss_mb']:.0f} MB\n")
    finally:
        server.stop()
    figures["replaced"] = replaced_under_load(service, work)
    figures["scaling"] = await scaling(service, small, large)
    shutil.rmtree(work)
    return figures


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--service",
        default=ROOT,
        help="the directory of the main.py to run (default: this repository)",
    )
    parser.add_argument(
        "--against", help="another service's directory: each query, alternated"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--cache", default=Path(tempfile.gettempdir()) / "ad-metrics-bench",
                        help="where the 100k and 5M databases are kept (default: %(default)s)")  # fmt: skip
    parser.add_argument("--soak", type=float, default=30, help="seconds (default: 30)")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    cli()
