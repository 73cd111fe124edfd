"""Benchmark the Ad Metrics API over HTTP against SQLite's own speed on the same file.

    python bench.py [--json FILE] [--cache DIR] [--soak SECONDS]

The databases come from seed.py, all at one density, so that a query on a day or a
month touches the same rows whatever the table's size: 1M+ rows (365 days, built afresh
each run to time the seed), and about 100k (35 days) and 5M+ (1,826 days) for scaling,
kept in --cache between runs. The service runs as a real uvicorn process (one worker,
no access log); the client talks to it over loopback with keep-alive connections.

Each query's latency is set against its engine floor: the fastest plain-sqlite3
computation of exactly the same response (rows, totals and total_rows), run in this
process on the same file. Two are tried, and both are checked against the API's answer:
SQL written by hand for that one query and finished in Python, and the service's own
statement run directly. Then come throughput against a trivial endpoint, scaling from
100k to 5M rows, a light query beside heavy ones, a soak with bad requests mixed in,
and the server's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import parse_qs

import main
import seed

HERE = Path(__file__).parent
DENSITY = 0.45
QUERIES = {  # name -> (what it is, query string)
    "Q1": (
        "a page of raw rows: one month",
        "start_date=2025-01-01&end_date=2025-01-31&limit=100",
    ),
    "Q2": ("a breakdown: by platform, all dates", "group_by=platform"),
    "Q3": (
        "a time series: by date, 1 platform and 1 region",
        "group_by=date&platform=Instagram&region=North%20America",
    ),
    "Q4": (
        "top 10 region-placements by cost, one quarter",
        "group_by=region,placement&sort=-cost&limit=10&start_date=2025-01-01"
        + "&end_date=2025-03-31",
    ),
    "Q5": ("weekly: by week and device, all dates", "group_by=week,device_type"),
    "Q6": (
        "narrow: one day, one region",
        "start_date=2025-01-15&end_date=2025-01-15&region=Latin%20America&limit=50",
    ),
    "Q7": ("a deep page: offset 500,000", "offset=500000"),
}
BAD = [  # mixed into the soak
    "region=Atlantis",
    "limit=0",
    "start_date=2025-02-30",
    "group_by=date,week",
    "sort=region&group_by=platform",
    "colour=red",
    "region=x%27%20OR%20%271%27%3D%271",
]
HEAVY = [
    f"/metrics?{QUERIES[q][1]}" for q in ("Q2", "Q4", "Q5", "Q7")
]  # the heavy lane's
KEY = "date_id, region_id, age_id, gender_id, platform_id, placement_id, device_type_id"
SUMS = "sum(impressions), sum(clicks), sum(cost), sum(conversions), sum(likes)"


# The client ------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection that GETs paths and times the answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = self.writer = None

    async def get(self, path: str) -> tuple[int, bytes, float]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port
            )
        began = time.perf_counter()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await self.reader.readexactly(length)
        return int(head[9:12]), body, time.perf_counter() - began

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.reader = self.writer = None


async def sequential(port: int, path: str, n: int, warmup: int = 3) -> list[float]:
    """Time n requests, one after the other, on one connection."""
    connection, times = Connection(port), []
    for i in range(warmup + n):
        status, body, seconds = await connection.get(path)
        assert status == 200, (path, status, body[:200])
        if i >= warmup:
            times.append(seconds)
    connection.close()
    return times


async def hammer(port: int, paths: list[str], clients: int, seconds: float) -> dict:
    """Loop `clients` connections over `paths`, picked at random, for `seconds`.

    Counts answers by status, and connection errors; collects the latencies.
    """
    stop = time.perf_counter() + seconds
    result = {"latencies": [], "statuses": {}, "errors": 0}
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
            result.setdefault("by_path", {}).setdefault(path, []).append(took)
            result["statuses"][status] = result["statuses"].get(status, 0) + 1
        connection.close()

    await asyncio.gather(*(loop(random.Random(i)) for i in range(clients)))
    return result


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


# The server ------------------------------------------------------------------------


class Server:
    """`uvicorn main:app` on a database: one worker, no access log."""

    def __init__(self, db: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "main:app",
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            [*command, "--no-access-log", "--log-level", "warning"],
            cwd=HERE,
            env={**os.environ, "ADS_DB": str(db), "LOG_LEVEL": "WARNING"},
        )
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


# The engine floor ------------------------------------------------------------------


def finish(impressions, clicks, cost, conversions, likes) -> dict:
    """The ten output metrics from a group's sums, rounded as the service rounds."""
    cents = math.floor(100 * cost + 0.5)

    def ratio(millionths: int, denominator: int) -> float | None:
        if not denominator:
            return None
        return (2 * millionths + denominator) // (2 * denominator) / 1e6

    return {
        "impressions": impressions,
        "clicks": clicks,
        "cost": cents / 100.0,
        "conversions": conversions,
        "likes": likes,
        "ctr": ratio(1_000_000 * clicks, impressions),
        "cpc": ratio(10_000 * cents, clicks),
        "cpm": ratio(10_000_000 * cents, impressions),
        "cpa": ratio(10_000 * cents, conversions),
        "conversion_rate": ratio(1_000_000 * conversions, clicks),
    }


class Floors:
    """For each query, SQL written for it alone, finished in Python: the quickest way
    to the same answer that I found. Like the service, it reads the names once."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.names = {
            dim: dict(db.execute(f"SELECT {column}, {name} FROM {table}"))
            for dim, (column, table, name) in main.DIMENSIONS.items()
        }
        self.ids = {
            d: {v: k for k, v in names.items()} for d, names in self.names.items()
        }
        self.dates = dict(db.execute("SELECT date_id, date_value FROM dim_date"))
        self.date_id = {v: k for k, v in self.dates.items()}
        self.monday = {}
        for i, value in self.dates.items():
            day = date.fromisoformat(value)
            self.monday[i] = (day - timedelta(days=day.weekday())).isoformat()

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
        names = [self.names[dim] for dim in main.DIMENSIONS]
        data = []
        for row in page:
            labels = zip(main.DIMENSIONS, names, row[1:7])
            data.append(
                {
                    "date": self.dates[row[0]],
                    **{dim: by_id[i] for dim, by_id, i in labels},
                    **finish(*row[7:]),
                }
            )
        return {"data": data, "totals": finish(*sums), "total_rows": count}

    def grouped(self, groups: list[tuple[dict, list]], order, limit: int) -> dict:
        """Finish, sort and cut groups given as (labels, sums)."""
        rows = sorted(
            ({**labels, **finish(*sums)} for labels, sums in groups), key=order
        )
        totals = finish(*(sum(sums[i] for _, sums in groups) for i in range(5)))
        return {"data": rows[:limit], "totals": totals, "total_rows": len(rows)}

    def q1(self) -> dict:
        month = [self.date_id["2025-01-01"], self.date_id["2025-01-31"]]
        return self.fact_rows("date_id BETWEEN ? AND ?", month, 100)

    def q2(self) -> dict:
        rows = self.db.execute(
            f"SELECT platform_id, {SUMS} FROM fact_ad_metrics_daily GROUP BY 1"
        )
        groups = [({"platform": self.names["platform"][p]}, s) for p, *s in rows]
        return self.grouped(groups, lambda r: self.ids["platform"][r["platform"]], 100)

    def q3(self) -> dict:
        rows = self.db.execute(
            f"SELECT date_id, {SUMS} FROM fact_ad_metrics_daily "
            "WHERE platform_id = ? AND region_id = ? GROUP BY 1",
            [self.ids["platform"]["Instagram"], self.ids["region"]["North America"]],
        )
        groups = [({"date": self.dates[d]}, s) for d, *s in rows]
        return self.grouped(groups, lambda r: r["date"], 100)

    def q4(self) -> dict:
        rows = self.db.execute(
            f"SELECT region_id, placement_id, {SUMS} FROM fact_ad_metrics_daily "
            "WHERE date_id BETWEEN ? AND ? GROUP BY 1, 2",
            [self.date_id["2025-01-01"], self.date_id["2025-03-31"]],
        )
        region, placement = self.names["region"], self.names["placement"]
        groups = [
            ({"region": region[r], "placement": placement[p]}, s) for r, p, *s in rows
        ]
        ids = self.ids

        def order(row: dict) -> tuple:
            return (
                -row["cost"],
                ids["region"][row["region"]],
                ids["placement"][row["placement"]],
            )

        return self.grouped(groups, order, 10)

    def q5(self) -> dict:
        rows = self.db.execute(
            f"SELECT date_id, device_type_id, {SUMS} FROM fact_ad_metrics_daily GROUP BY 1, 2"
        )
        weeks: dict[tuple, list] = {}
        for day, device, *sums in rows:
            week = weeks.setdefault((self.monday[day], device), [0, 0, 0.0, 0, 0])
            for i, value in enumerate(sums):
                week[i] += value
        device_name, device_id = self.names["device_type"], self.ids["device_type"]
        groups = [
            ({"week": w, "device_type": device_name[d]}, s)
            for (w, d), s in weeks.items()
        ]
        return self.grouped(
            groups, lambda r: (r["week"], device_id[r["device_type"]]), 100
        )

    def q6(self) -> dict:
        where = [self.date_id["2025-01-15"], self.ids["region"]["Latin America"]]
        return self.fact_rows("date_id = ? AND region_id = ?", where, 50)

    def q7(self) -> dict:
        return self.fact_rows("1", [], 100, 500_000)


async def service_statements(db_path: Path) -> dict[str, tuple[str, list]]:
    """The statement and parameters the service itself runs, for each query."""
    database = main.Database(str(db_path), 10)
    try:
        catalog = await database.current()
    finally:
        await database.close()
    statements = {}
    for name, (_, query) in QUERIES.items():
        single = ("start_date", "end_date", "limit", "offset")
        fields = {k: v[-1] if k in single else v for k, v in parse_qs(query).items()}
        q = main.MetricsQuery.model_validate(fields)
        statements[name] = main.statement(q, catalog, main.resolve_filters(q, catalog))[
            :2
        ]
    return statements


def timed(fn, n: int = 30) -> list[float]:
    """Run fn once to warm up, then n times; return the times."""
    fn()
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


# The run ---------------------------------------------------------------------------


def build(path: Path, days: int, cached: bool) -> tuple[int, float]:
    """Seed `path` (unless cached and there); return its rows and the seconds taken."""
    if cached and path.exists():
        with sqlite3.connect(path) as db:
            count = "SELECT count(*) FROM fact_ad_metrics_daily"
            return db.execute(count).fetchone()[0], 0.0
    began = time.perf_counter()
    rows = seed.seed(path, days=days, density=DENSITY, force=True)
    return rows, time.perf_counter() - began


async def latencies(server: Server, db_path: Path) -> dict:
    """Each query's API latency, its engine floor, and their ratio."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    floors, statements = Floors(db), await service_statements(db_path)
    figures = {}
    print(f"\n{'':53} API p50   API p95  floor p50  floor  API/floor")
    for name, (what, query) in QUERIES.items():
        path = f"/metrics?{query}"
        api = await sequential(server.port, path, 30)
        _, body, _ = await Connection(server.port).get(path)
        answer = json.loads(body)
        expected = [answer["data"], answer["totals"], answer["paging"]["total_rows"]]
        by_hand = getattr(floors, name.lower())
        hand = by_hand()
        assert [hand["data"], hand["totals"], hand["total_rows"]] == expected, name
        sql, params = statements[name]
        data, totals, total_rows = db.execute(sql, params).fetchone()
        assert [json.loads(data), json.loads(totals), total_rows] == expected, name

        def own(sql: str = sql, params: list = params) -> tuple:
            return db.execute(sql, params).fetchone()

        floor_times = {"SQL": timed(by_hand), "stmt": timed(own)}
        kind, floor = min(floor_times.items(), key=lambda kv: statistics.median(kv[1]))
        p50, p95, f50 = (
            statistics.median(api),
            percentile(api, 95),
            statistics.median(floor),
        )
        figures[name] = {
            "query": query,
            "api_p50_ms": p50 * 1e3,
            "api_p95_ms": p95 * 1e3,
            "floor_p50_ms": f50 * 1e3,
            "floor": kind,
            "floor_p50_ms_by_kind": {
                k: statistics.median(t) * 1e3 for k, t in floor_times.items()
            },
            "ratio": p50 / f50,
            "over_floor_ms": (p50 - f50) * 1e3,
        }
        over = f"  +{(p50 - f50) * 1e3:.2f} ms" if name == "Q6" else ""
        print(
            f"{name} {what:50} {p50 * 1e3:7.2f}ms {p95 * 1e3:7.2f}ms "
            f"{f50 * 1e3:8.2f}ms  {kind:5} {p50 / f50:8.2f}x{over}"
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
    print(
        f"\nQ6 throughput, 16 clients: {statistics.median(ratios):.1%} of /dimensions' "
        f"(runs: {', '.join(f'{n:,.0f} vs {t:,.0f} req/s' for t, n in rates)})"
    )
    return {"q6_vs_trivial": statistics.median(ratios), "req_per_s": rates}


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
        f"Q6 p95 while 4 clients loop on Q2: {busy:.2f} ms, "
        f"{busy / idle_p95_ms:.1f}x its idle p95 of {idle_p95_ms:.2f} ms"
    )
    return {
        "idle_p95_ms": idle_p95_ms,
        "beside_q2_p95_ms": busy,
        "ratio": busy / idle_p95_ms,
    }


async def soak(server: Server, seconds: float) -> dict:
    """32 clients on a mix of the queries, bad requests and the other endpoints."""
    paths = [f"/metrics?{q}" for _, q in QUERIES.values()]
    paths += [f"/metrics?{q}" for q in BAD] + ["/dimensions", "/health"]
    paths += [f"/metrics?{QUERIES['Q6'][1]}"] * 4  # mostly light requests
    warm = await hammer(server.port, paths, 32, 5)
    rss_warm = server.memory()
    run = await hammer(server.port, paths, 32, seconds)
    rss_end = server.memory()
    statuses = dict(sorted(run["statuses"].items()))
    figures = {
        "seconds": seconds,
        "clients": 32,
        "answers": sum(statuses.values()),
        "statuses": statuses,
        "connection_errors": warm["errors"] + run["errors"],
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "p99_ms": percentile(run["latencies"], 99) * 1e3,
        # In a closed loop, the heavy queries (all dates, or a quarter) queue for the
        # heavy lane's cores; the rest should not notice.
        "p99_ms_heavy": percentile(
            [t for p in HEAVY for t in run["by_path"].get(p, [])], 99
        )
        * 1e3,
        "p99_ms_light": percentile(
            [t for p, ts in run["by_path"].items() if p not in HEAVY for t in ts], 99
        )
        * 1e3,
        "rss_after_warmup_mb": rss_warm,
        "rss_end_mb": rss_end,
    }
    print(
        f"\nsoak: {seconds:g} s, 32 clients: {figures['answers']:,} answers {statuses}, "
        f"{figures['connection_errors']} connection errors, {figures['server_errors']} "
        f"5xx, p99 {figures['p99_ms']:.0f} ms (light requests {figures['p99_ms_light']:.1f} ms, "
        f"heavy {figures['p99_ms_heavy']:.0f} ms); RSS {rss_warm:.0f} MB after warm-up, "
        f"{rss_end:.0f} MB at the end ({rss_end / rss_warm:.2f}x)"
    )
    return figures


async def scaling(small: Path, large: Path) -> dict:
    """Q1's and Q6's p50 on the 100k and the 5M database."""
    figures = {name: {} for name in ("Q1", "Q6")}
    for label, path in (("small", small), ("large", large)):
        server = Server(path)
        try:
            for name, by in figures.items():
                path = f"/metrics?{QUERIES[name][1]}"
                by[label + "_p50_ms"] = (
                    statistics.median(await sequential(server.port, path, 30)) * 1e3
                )
        finally:
            server.stop()
    for name, by in figures.items():
        by["ratio"] = by["large_p50_ms"] / by["small_p50_ms"]
        print(
            f"{name} p50: {by['small_p50_ms']:.2f} ms at 100k rows, "
            f"{by['large_p50_ms']:.2f} ms at 5M rows: {by['ratio']:.2f}x"
        )
    return figures


async def run(args: argparse.Namespace) -> dict:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ad-metrics-bench-"))
    rows, seconds = build(work / "1m.db", 365, cached=False)
    figures = {
        "seed": {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds}
    }
    print(f"seed.py: {rows:,} rows in {seconds:.2f} s ({rows / seconds:,.0f} rows/s)")
    small, large = cache / f"days35-{DENSITY}.db", cache / f"days1826-{DENSITY}.db"
    counts = [build(small, 35, cached=True)[0], build(large, 1826, cached=True)[0]]
    figures["scaling_rows"] = counts
    print(f"scaling databases: {counts[0]:,} and {counts[1]:,} rows, kept in {cache}")
    server = Server(work / "1m.db")
    try:
        figures["queries"] = await latencies(server, work / "1m.db")
        figures["throughput"] = await throughput(server)
        idle = figures["queries"]["Q6"]["api_p95_ms"]
        figures["isolation"] = await isolation(server, idle)
        figures["soak"] = await soak(server, args.soak)
        figures["peak_rss_mb"] = server.memory("VmHWM")
        print(f"server peak RSS over the run: {figures['peak_rss_mb']:.0f} MB\n")
    finally:
        server.stop()
    figures["scaling"] = await scaling(small, large)
    return figures


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--cache",
        default=Path(tempfile.gettempdir()) / "ad-metrics-bench",
        help="where the 100k and 5M databases are kept (default: %(default)s)",
    )
    parser.add_argument("--soak", type=float, default=30, help="seconds (default: 30)")
    args = parser.parse_args()
    try:  # the client's own cost matters on a small machine: use uvloop if it is there
        import uvloop
    except ImportError:
        figures = asyncio.run(run(args))
    else:
        figures = uvloop.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    cli()
