"""Ad Metrics API: daily advertising metrics from a SQLite star schema.

GET /metrics filters, groups, sorts and pages the metrics and adds totals; GET
/dimensions lists the values to filter by; GET /health reports on the database and on
the heartbeat, a job that records one run per 6-hour UTC slot across all workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Annotated, Literal, get_args
from urllib.parse import quote, unquote_plus

import aiosqlite
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def positive(name: str, default: str, kind: type = int):
    """Read a positive number from the environment, or stop, naming the variable."""
    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SystemExit(f"{name} must be a positive {kind.__name__}, not {raw!r}")
    return value


DB_PATH = os.environ.get("ADS_DB", "ads.db")
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = positive("PORT", "8000")
HEARTBEAT_INTERVAL_SECONDS = positive("HEARTBEAT_INTERVAL_SECONDS", "21600")
QUERY_TIMEOUT_SECONDS = positive("QUERY_TIMEOUT_SECONDS", "10", float)
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR"):
    raise SystemExit(
        f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {LOG_LEVEL!r}"
    )
# A query estimated to read more rows than HEAVY_ROWS runs in the heavy lane: one
# connection per core, at a lower CPU priority. Heavy queries then never crowd the
# cores, and never stall a light one.
HEAVY_ROWS = 200_000
LANES = {"light": 8, "heavy": os.cpu_count() or 2}  # connections in each lane

log = logging.getLogger("ad_metrics")

# The allow-lists: every identifier in the SQL below comes from these.
FACT = "fact_ad_metrics_daily"
DIMENSIONS = {  # API name -> (fact column, dimension table, name column)
    "region": ("region_id", "dim_region", "region_name"),
    "age_group": ("age_id", "dim_age_group", "age_range"),
    "gender": ("gender_id", "dim_gender", "gender_name"),
    "platform": ("platform_id", "dim_platform", "platform_name"),
    "placement": ("placement_id", "dim_placement", "placement_name"),
    "device_type": ("device_type_id", "dim_device_type", "device_type_name"),
}
GroupField = Literal[
    "date", "week", "month", "region", "age_group", "gender", "platform", "placement",
    "device_type",
]  # fmt: skip
GROUP_FIELDS = list(get_args(GroupField))
PERIODS = {  # a period's label, from dim_date.date_value
    "week": "date(date_value, 'weekday 0', '-6 days')",  # the Monday of its ISO week
    "month": "substr(date_value, 1, 7)",
}
DEFAULT_GROUP_BY = ["date", *DIMENSIONS]  # the fact table's grain: a row per fact row
BASE_METRICS = ["impressions", "clicks", "cost", "conversions", "likes"]
CENTS = "CAST(round(100 * cost) AS INTEGER)"
DERIVED_METRICS = {  # name -> (numerator in millionths, denominator), from a group's sums
    "ctr": ("1000000 * clicks", "impressions"),
    "cpc": (f"10000 * {CENTS}", "clicks"),
    "cpm": (f"10000000 * {CENTS}", "impressions"),
    "cpa": (f"10000 * {CENTS}", "conversions"),
    "conversion_rate": ("1000000 * conversions", "clicks"),
}
METRICS = [*BASE_METRICS, *DERIVED_METRICS]
# The output values. Cost is money, reported in whole cents; the ratios are exact
# fractions of the reported values, rounded half-up to 6 decimals in integer
# arithmetic, (2n + d) / 2d, so no float error ever shows. A zero denominator is null.
OUTPUTS = ", ".join(
    ["impressions", "clicks", f"{CENTS} / 100.0 AS cost", "conversions", "likes"]
    + [f"(2*{n} + {d}) / NULLIF(2*{d}, 0) / 1e6 AS {m}" for m, (n, d) in DERIVED_METRICS.items()]
)  # fmt: skip
METRICS_JSON = ", ".join(f"'{m}', {m}" for m in METRICS)


class StartupError(Exception):
    """Keeps the service from starting; its message is the one line the operator sees."""


class Unavailable(Exception):
    """The database cannot answer now (503); the message says why."""


@dataclass(frozen=True)
class Catalog:
    """What a database file holds besides its facts, read once when it is opened."""

    dates: list[str]  # ISO dates, in date order
    date_ids: list[int]  # their ids, in the same order
    ids: dict[str, dict[str, int]]  # dimension -> casefolded name -> id
    names: dict[str, list[str]]  # dimension -> names, in id order
    dates_follow_ids: bool  # date_id order is date order, so the key sorts by date
    one_row_per_key: bool  # the seven ids are a unique key of the fact table
    fact_rows: int  # to tell heavy queries from light ones
    listing: bytes  # the body of GET /dimensions

    def ids_between(self, start: date | None, end: date | None) -> list[int]:
        """Return the ids of the dates from start to end, both included."""
        lo = bisect_left(self.dates, start.isoformat()) if start else 0
        hi = bisect_right(self.dates, end.isoformat()) if end else len(self.dates)
        return self.date_ids[lo:hi]


async def load_catalog(db: aiosqlite.Connection) -> Catalog:
    """Read the dimension tables, checking the columns the queries use."""
    id_columns = [column for column, _, _ in DIMENSIONS.values()]
    columns = ", ".join(id_columns + BASE_METRICS)
    await db.execute_fetchall(f"SELECT date_id, {columns} FROM {FACT} LIMIT 0")
    dates = await db.execute_fetchall("SELECT date_value, date_id FROM dim_date")
    for value, _ in dates:
        if not isinstance(value, str) or date.fromisoformat(value).isoformat() != value:
            raise ValueError(f"dim_date holds {value!r}, not a YYYY-MM-DD date")
    dates = sorted(dates)
    ids, names = {}, {}
    for dim, (column, table, name) in DIMENSIONS.items():
        sql = f"SELECT {column}, {name} FROM {table} ORDER BY 1"
        rows = await db.execute_fetchall(sql)
        names[dim] = [str(n) for _, n in rows]
        # Casefolded names to ids; if two names fold alike, the first id wins.
        ids[dim] = {str(n).casefold(): i for i, n in reversed(rows)}
    unique_keys: dict[str, set[str]] = {}
    for index, column in await db.execute_fetchall(
        "SELECT il.name, ii.name FROM pragma_index_list(?) AS il "
        "JOIN pragma_index_info(il.name) AS ii WHERE il.\"unique\"", [FACT]
    ):  # fmt: skip
        unique_keys.setdefault(index, set()).add(column)
    # The fact table's size: from ANALYZE's statistics if the file has them, else counted.
    exists = "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
    stat = "SELECT stat FROM sqlite_stat1 WHERE tbl = ? LIMIT 1"
    stats = await db.execute_fetchall(exists) and await db.execute_fetchall(
        stat, [FACT]
    )
    count = f"SELECT count(*) FROM {FACT}"
    [[fact_rows]] = stats or await db.execute_fetchall(count)
    span = {"first": dates[0][0], "last": dates[-1][0]} if dates else {}
    listing = {"date": {"first": None, "last": None, **span}, **names}
    return Catalog(
        dates=[d for d, _ in dates],
        date_ids=[i for _, i in dates],
        ids=ids,
        names=names,
        dates_follow_ids=[i for _, i in dates] == sorted(i for _, i in dates),
        one_row_per_key={"date_id", *id_columns} in unique_keys.values(),
        fact_rows=int(str(fact_rows).split()[0]),  # a stat's first number is the rows
        listing=json.dumps(listing, separators=(",", ":")).encode(),
    )


class LowPriority(sqlite3.Connection):
    """A connection whose thread gives way to all the others for the CPU.

    sqlite3 connects in the thread that will run the connection's queries (aiosqlite
    keeps one per connection), and on Linux a thread's own id names it for
    setpriority: this lowers the priority of that one thread.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if sys.platform == "linux":
            with contextlib.suppress(OSError):  # a refinement, not a need
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Database:
    """Read-only connections to the file at `path`, in two lanes, kept open and
    reopened when the file is replaced. Each runs its queries in its own thread."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.idle: dict[str, asyncio.Queue[aiosqlite.Connection]] = {}
        self.connections: list[aiosqlite.Connection] = []
        self.file_id: tuple[int, int] | None = None  # (device, inode) of the open file
        self.catalog: Catalog | None = None
        self.checked_at = float("-inf")
        self.lock = asyncio.Lock()

    async def current(self) -> Catalog:
        """Return the catalog of the file at the path, opening the file if it is new.

        The path is looked at once a second at most: a stat() on every request costs
        more than a small query, because the call hands the GIL to the query threads.
        """
        if self.catalog is None or time.monotonic() - self.checked_at >= 1:
            try:
                st = os.stat(self.path)
            except OSError as e:
                raise Unavailable(
                    f"database {self.path} is missing: {e.strerror}"
                ) from None
            async with self.lock:
                if self.catalog is None or (st.st_dev, st.st_ino) != self.file_id:
                    await self.close()
                    await self.open((st.st_dev, st.st_ino))
                self.checked_at = time.monotonic()
        return self.catalog

    async def open(self, file_id: tuple[int, int]) -> None:
        uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro"
        try:
            for lane, count in LANES.items():
                factory = LowPriority if lane == "heavy" else sqlite3.Connection
                self.idle[lane] = asyncio.Queue()
                for _ in range(count):
                    db = await aiosqlite.connect(
                        uri, uri=True, factory=factory, cached_statements=1024
                    )
                    self.connections.append(db)
                    self.idle[lane].put_nowait(db)
            self.catalog = await load_catalog(db)
        except (sqlite3.Error, ValueError) as e:
            await self.close()
            raise Unavailable(f"database {self.path} cannot be read: {e}") from None
        self.file_id = file_id

    async def close(self) -> None:
        connections, self.connections = self.connections, []
        self.catalog, self.idle = None, {}
        for db in connections:
            await db.close()  # after the query it is running, if any

    async def fetch(self, sql: str, params: list, lane: str = "light") -> list[tuple]:
        """Run one statement on an idle connection, interrupted at the time limit."""
        await self.current()
        idle = self.idle[lane]  # the connection's own pool, even after a reopen
        try:
            db = await asyncio.wait_for(idle.get(), self.timeout)
        except TimeoutError:
            busy = f"every connection stayed busy for {self.timeout:g} s; retry later"
            raise Unavailable(busy) from None
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout, lambda: loop.create_task(db.interrupt()))
        try:
            return await db.execute_fetchall(sql, params)
        except asyncio.CancelledError:
            await db.interrupt()  # the client is gone: free the connection
            raise
        except (sqlite3.Error, ValueError) as e:  # ValueError: closed by a reopen
            if isinstance(e, sqlite3.ProgrammingError):
                raise  # a fault of ours, not of the file
            if str(e) == "interrupted" and loop.time() >= timer.when():
                raise Unavailable(
                    f"the query ran longer than {self.timeout:g} s and was stopped; "
                    "narrow the date range, add filters or group by fewer fields"
                ) from None
            if getattr(e, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                log.warning("database %s failed: %s", self.path, e)
                self.catalog = None  # reopen the file on the next request
            raise Unavailable(f"database {self.path} cannot be read: {e}") from None
        finally:
            timer.cancel()
            idle.put_nowait(db)


def shorten(value: str) -> str:
    """Quote a client's value for a message, cut to a readable length."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


def split_values(values: list[str], info: ValidationInfo) -> list[str]:
    """Take repeated and comma-separated values; refuse empty and repeated ones."""
    items = [item.strip() for value in values for item in value.split(",")]
    seen = set()
    for item in items:
        name = info.field_name
        if not item:
            raise PydanticCustomError("string_too_short", f"{name} has an empty value")
        if item.removeprefix("-").casefold() in seen:  # "-cost" repeats "cost" in sort
            raise PydanticCustomError(
                "value_error", f"{name} lists {shorten(item)} more than once"
            )
        seen.add(item.removeprefix("-").casefold())
    return items


def not_one_of(field: str, value: str, valid: list[str]) -> PydanticCustomError:
    message = f"{field} {shorten(value)} is not one of: {', '.join(valid)}"
    return PydanticCustomError("literal_error", message)


def filter_field(dim: str) -> list[str]:
    return Field(
        default_factory=list,
        description=f"Keep only these {dim.replace('_', ' ')} values (GET /dimensions "
        "lists them): repeat the parameter or separate values with commas; any case.",
    )


class MetricsQuery(BaseModel):
    """The query parameters of GET /metrics."""

    model_config = ConfigDict(extra="forbid")

    start_date: date | None = Field(
        None, description="First day, inclusive: YYYY-MM-DD."
    )
    end_date: date | None = Field(None, description="Last day, inclusive: YYYY-MM-DD.")
    region: list[str] = filter_field("region")
    age_group: list[str] = filter_field("age_group")
    gender: list[str] = filter_field("gender")
    platform: list[str] = filter_field("platform")
    placement: list[str] = filter_field("placement")
    device_type: list[str] = filter_field("device_type")
    group_by: list[GroupField] = Field(
        default_factory=lambda: list(DEFAULT_GROUP_BY),
        description="The breakdown, in output order; at most one of date, week and "
        "month. Default: the seven fact dimensions, one row per fact row.",
    )
    sort: list[str] = Field(
        default_factory=list,
        description="Output fields to sort by, '-' for descending: grouped fields or "
        f"metrics ({', '.join(METRICS)}). The group_by fields then break ties.",
    )
    limit: int = Field(100, ge=1, le=1000, description="Rows per page.")
    offset: int = Field(0, ge=0, le=2**63 - 1, description="Rows to skip.")

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def iso_date(cls, value: object, info: ValidationInfo) -> object:
        """Accept YYYY-MM-DD only, and only real dates."""
        if not isinstance(value, str):
            return value
        try:
            if re.fullmatch("[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
                return date.fromisoformat(value)
            problem = "is not a date in YYYY-MM-DD form"
        except ValueError:
            problem = "is not a real date"
        message = f"{info.field_name} {shorten(value)} {problem}"
        raise PydanticCustomError("date_parsing", message)

    @field_validator("end_date")
    @classmethod
    def end_after_start(cls, end: date | None, info: ValidationInfo) -> date | None:
        start = info.data.get("start_date")
        if start and end and end < start:
            message = f"end_date {end} is before start_date {start}"
            raise PydanticCustomError("value_error", message)
        return end

    @field_validator(*DIMENSIONS)
    @classmethod
    def split(cls, values: list[str], info: ValidationInfo) -> list[str]:
        return split_values(values, info)

    @field_validator("group_by", mode="before")
    @classmethod
    def check_group_by(cls, values: list[str], info: ValidationInfo) -> list[str]:
        fields = split_values(values, info)
        for field in fields:
            if field not in GROUP_FIELDS:
                raise not_one_of("group_by", field, GROUP_FIELDS)
        periods = [f for f in fields if f in ("date", *PERIODS)]
        if len(periods) > 1:
            message = f"group_by takes one of date, week and month, not {periods}"
            raise PydanticCustomError("value_error", message)
        return fields

    @field_validator("sort")
    @classmethod
    def check_sort(cls, values: list[str], info: ValidationInfo) -> list[str]:
        """Sort by output fields only, each once."""
        sort = split_values(values, info)
        valid = [*info.data.get("group_by", GROUP_FIELDS), *METRICS]
        for item in sort:
            if item.removeprefix("-") not in valid:
                raise not_one_of("sort", item, valid)
        return sort


def resolve_filters(query: MetricsQuery, catalog: Catalog) -> dict[str, list[int]]:
    """Map each filter's names to ids, or answer 422 with the valid names."""
    filters, errors = {}, []
    for dim in DIMENSIONS:
        names, known = getattr(query, dim), catalog.ids[dim]
        for name in names:
            if name.casefold() not in known:
                message = not_one_of(dim, name, catalog.names[dim]).message()
                loc = ("query", dim)
                errors.append(
                    {"type": "literal_error", "loc": loc, "msg": message, "input": name}
                )
        if names:
            filters[dim] = [known.get(name.casefold()) for name in names]
    if errors:
        raise RequestValidationError(errors)
    return filters


def column(field: str) -> str:
    """Name the column that holds a group_by field in the grouped rows."""
    if field in DIMENSIONS:
        return DIMENSIONS[field][0]
    return "date_id" if field == "date" else field


def label(field: str) -> tuple[str, str]:
    """Return the SQL for a group_by field's output value on a page row, and the join
    that supplies it: a LEFT JOIN keeps the page's order, and rows with unknown ids."""
    if field in PERIODS:
        return f"page.{field}", ""
    key, table, name = DIMENSIONS.get(field, ("date_id", "dim_date", "date_value"))
    return f"{table}.{name}", f" LEFT JOIN {table} ON {table}.{key} = page.{key}"


@lru_cache(maxsize=1024)
def build_sql(
    fields: tuple[str, ...],
    sort: tuple[str, ...],
    filtered: tuple[tuple[str, int], ...],
    dated: bool,
    dates_follow_ids: bool,
    one_row_per_key: bool,
) -> str:
    """Write the one statement for a query of this shape. Its one row holds the page
    as JSON, the totals as JSON and the number of groups: SQLite does all the work,
    and the thread that runs it hands back a single value."""
    # One placeholder per filter value: unlike a JSON list, it lets SQLite seek on a
    # key column after the first.
    where = ["date_id IN (SELECT value FROM json_each(?))"] * dated
    where += [f"{DIMENSIONS[dim][0]} IN ({', '.join('?' * n)})" for dim, n in filtered]
    where_sql = f"WHERE {' AND '.join(where)}" if where else ""
    # Aggregate on the fact table's own ids; names are looked up for the page only.
    ids = ", ".join(DIMENSIONS[f][0] if f in DIMENSIONS else "date_id" for f in fields)
    sums = ", ".join(f"sum({m}) AS {m}" for m in BASE_METRICS)
    if set(fields) == set(DEFAULT_GROUP_BY) and one_row_per_key:
        # A group is a fact row: nothing to aggregate, and read in key order, the
        # page stops at its last row instead of sorting them all.
        groups = f"SELECT {ids}, {', '.join(BASE_METRICS)} FROM {FACT} {where_sql}"
        materialized = "NOT MATERIALIZED"
    else:
        groups = f"SELECT {ids}, {sums} FROM {FACT} {where_sql} GROUP BY {ids}"
        materialized = "MATERIALIZED"  # aggregated once, for the page and the totals
    period = next((f for f in fields if f in PERIODS), None)
    if period:  # roll days up into weeks or months: a few rows a day, not fact rows
        keys = [f"{PERIODS[f]} AS {f}" if f == period else column(f) for f in fields]
        groups = (
            f"SELECT {', '.join(keys)}, {sums} FROM ({groups}) JOIN dim_date "
            f"USING (date_id) GROUP BY {', '.join(map(column, fields))}"
        )
    order = []
    sorted_by = {item.removeprefix("-") for item in sort}
    for item in [*sort, *(f for f in fields if f not in sorted_by)]:
        field = item.removeprefix("-")
        key = column(field)
        if field == "date" and not dates_follow_ids:
            key = "(SELECT date_value FROM dim_date WHERE dim_date.date_id = g.date_id)"
        nulls = (
            " NULLS LAST" if field in DERIVED_METRICS else ""
        )  # only ratios are null
        order.append(f"{key} {'DESC' if item.startswith('-') else 'ASC'}{nulls}")
    totals = ", ".join(f"coalesce(sum({m}), 0) AS {m}" for m in BASE_METRICS)
    labels = [label(f) for f in fields]
    row = ", ".join(
        [*(f"'{f}', {sql}" for f, (sql, _) in zip(fields, labels)), METRICS_JSON]
    )
    page = (
        f"SELECT {', '.join(map(column, fields))}, {OUTPUTS} FROM g "
        f"ORDER BY {', '.join(order)} LIMIT ? OFFSET ?"
    )
    joins = "".join(join for _, join in labels)
    return (  # the JSON comes back as bytes, never decoded
        f"WITH g AS {materialized} ({groups}) SELECT "
        f"CAST((SELECT json_group_array(json_object({row})) FROM ({page}) AS page{joins}) AS BLOB), "
        f"CAST(json_object({METRICS_JSON}) AS BLOB), group_count FROM (SELECT group_count, "
        f"{OUTPUTS} FROM (SELECT count(*) AS group_count, {totals} FROM g))"
    )  # fmt: skip


def statement(query: MetricsQuery, catalog: Catalog, filters: dict[str, list[int]]):
    """Return the SQL and parameters for a query, and the rows it will read."""
    # With a filter, the date ids are listed too (all of them if no range is given):
    # the key's first column pinned, SQLite seeks to each day's matching rows,
    # whether or not the file has the statistics for a skip-scan.
    dated = bool(query.start_date or query.end_date or filters)
    shape = tuple((dim, len(ids)) for dim, ids in filters.items())
    sql = build_sql(
        tuple(query.group_by), tuple(query.sort), shape, dated,
        catalog.dates_follow_ids, catalog.one_row_per_key,
    )  # fmt: skip
    days = catalog.ids_between(query.start_date, query.end_date)
    ids = [i for values in filters.values() for i in values]
    params = [*[json.dumps(days)] * dated, *ids, query.limit, query.offset]
    # The rows it reads if the facts spread evenly: what tells heavy from light.
    rows = catalog.fact_rows * len(days) / max(len(catalog.dates), 1)
    for dim, values in filters.items():
        rows *= len(values) / max(len(catalog.names[dim]), 1)
    return sql, params, rows


class Metrics(BaseModel):
    impressions: int
    clicks: int
    cost: float = Field(description="In the data's currency, rounded to cents.")
    conversions: int
    likes: int
    ctr: float | None = Field(description="clicks / impressions, or null")
    cpc: float | None = Field(description="cost / clicks, or null")
    cpm: float | None = Field(description="1000 * cost / impressions, or null")
    cpa: float | None = Field(description="cost / conversions, or null")
    conversion_rate: float | None = Field(description="conversions / clicks, or null")


class Row(Metrics):
    """A group: its group_by fields (only those), in group_by order, then its metrics."""

    date: str | None = Field(None, description="YYYY-MM-DD")
    week: str | None = Field(None, description="The week's Monday, YYYY-MM-DD")
    month: str | None = Field(None, description="YYYY-MM")
    region: str | None = None
    age_group: str | None = None
    gender: str | None = None
    platform: str | None = None
    placement: str | None = None
    device_type: str | None = None


class Paging(BaseModel):
    limit: int
    offset: int
    total_rows: int = Field(description="Rows in the whole result, all pages together.")
    next: str | None = Field(
        description="The next page's relative URL; null on the last."
    )


class MetricsPage(BaseModel):
    data: list[Row]
    totals: Metrics = Field(
        description="Over every row that matches, not only the page."
    )
    paging: Paging


class Problem(BaseModel):
    detail: str = Field(description="What is wrong, and what to do about it.")


JOB_RUNS = (
    "CREATE TABLE IF NOT EXISTS job_runs "
    "(slot TEXT PRIMARY KEY, ran_at TEXT NOT NULL, pid INTEGER NOT NULL)"
)


class Heartbeat:
    """Runs once per slot of a UTC grid, in one of the processes that share the file."""

    def __init__(self, path: str, interval: int) -> None:
        self.path, self.interval = path, interval
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.runs: set[asyncio.Task] = set()

    def start(self) -> None:
        """Schedule the runs, the latest slot's first."""
        # Slots are multiples of the interval since the epoch: restarts keep the grid.
        # The latest slot is due at once; if it has run already, its claim just fails.
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        self.scheduler.add_job(
            self.run,
            IntervalTrigger(seconds=self.interval, start_date=epoch),
            id="heartbeat",
            next_run_time=datetime.fromtimestamp(self.slot_of(time.time()), UTC),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=self.interval,  # late is fine, until the next slot
        )
        self.scheduler.start()

    def slot_of(self, timestamp: float) -> float:
        return timestamp // self.interval * self.interval

    async def run(self) -> None:
        """Claim the current slot; the process whose claim wins logs the heartbeat."""
        task = asyncio.current_task()
        self.runs.add(task)
        now = time.time()
        slot = datetime.fromtimestamp(self.slot_of(now), UTC).isoformat()
        ran_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        # Give up half a second before the next slot is due, so that it is not skipped.
        deadline = self.slot_of(now) + self.interval - 0.5
        try:
            if await self.claim(slot, ran_at, deadline):
                log.info("heartbeat slot=%s ran_at=%s", slot, ran_at)
        except asyncio.CancelledError:
            log.info("heartbeat slot=%s not recorded: the server is stopping", slot)
        except Exception:
            log.exception("heartbeat slot=%s failed", slot)
        finally:
            self.runs.discard(task)

    async def claim(self, slot: str, ran_at: str, deadline: float) -> bool:
        """Insert the slot's row unless it is there. While another process holds the
        write lock, wait in the event loop, not in a thread, so a stop can cancel it."""
        async with aiosqlite.connect(
            self.path, isolation_level=None, timeout=0.05
        ) as db:
            while True:
                try:
                    await db.execute(JOB_RUNS)  # again: the file may have been replaced
                    cursor = await db.execute(
                        "INSERT INTO job_runs (slot, ran_at, pid) VALUES (?, ?, ?) "
                        "ON CONFLICT (slot) DO NOTHING",
                        (slot, ran_at, os.getpid()),
                    )
                    return cursor.rowcount == 1
                except sqlite3.OperationalError as e:
                    if e.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise
                    if time.time() > deadline:
                        raise TimeoutError("the database stayed locked too long") from e
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop scheduling; give a running claim two seconds, then cancel it."""
        self.scheduler.pause()
        # A run submitted a moment ago starts now, so that it is waited for too.
        await asyncio.sleep(0)
        if self.runs:
            _, pending = await asyncio.wait(self.runs, timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self.scheduler.shutdown(wait=False)

    def state(self) -> dict:
        job = self.scheduler.get_job("heartbeat")
        next_run = job.next_run_time if job else None
        return {
            "running": self.scheduler.running,
            "interval_seconds": self.interval,
            "next_run_at": next_run.isoformat() if next_run else None,
        }


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    # Start-up: open the database, or stop with one line that says what is wrong.
    if not log.handlers:
        handler = logging.StreamHandler()
        line = "%(levelname)s:     %(name)s[%(process)d] %(message)s"
        handler.setFormatter(logging.Formatter(line))
        log.addHandler(handler)
    log.setLevel(LOG_LEVEL)
    if not os.path.exists(DB_PATH):
        raise StartupError(
            f"database {DB_PATH} not found; create it with: python seed.py --db {DB_PATH}"
        )
    db = Database(DB_PATH, QUERY_TIMEOUT_SECONDS)
    heartbeat = Heartbeat(DB_PATH, HEARTBEAT_INTERVAL_SECONDS)
    try:
        await db.current()
    except Unavailable as e:
        raise StartupError(str(e)) from None
    heartbeat.start()
    app.state.db, app.state.heartbeat = db, heartbeat
    yield
    # Shutdown: let a running heartbeat finish, then close every connection.
    await heartbeat.stop()
    await db.close()


# No redirects: an unknown path is a 404, whether or not it ends with a slash.
app = FastAPI(
    title="Ad Metrics API", version="1.0", lifespan=lifespan, redirect_slashes=False
)


class OneLineStartupErrors:
    """Hand a StartupError to the server as its one-line message, not a traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def send_message(message: dict) -> None:
            error = sys.exc_info()[1]  # the router reports a failure while handling it
            failed = message["type"] == "lifespan.startup.failed"
            if failed and isinstance(error, StartupError):
                message = {**message, "message": str(error)}
            await send(message)

        lifespan = scope["type"] == "lifespan"
        await self.app(scope, receive, send_message if lifespan else send)


app.add_middleware(OneLineStartupErrors)


@app.exception_handler(RequestValidationError)
async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's standard 422 body, each message naming its parameter and value."""
    detail = jsonable_encoder(error.errors())
    for e in detail:
        name = str(e["loc"][-1])
        if not e["msg"].startswith(name):  # pydantic's own messages name neither
            e["msg"] = f"{name} {shorten(str(e.get('input')))}: {e['msg']}"
    return JSONResponse({"detail": detail}, status_code=422)


@app.exception_handler(Unavailable)
async def unavailable(request: Request, error: Unavailable) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503)


@app.exception_handler(Exception)
async def internal_error(request: Request, error: Exception) -> JSONResponse:
    # The server logs the traceback; the client learns only that the fault is ours.
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


UNAVAILABLE = {503: {"model": Problem, "description": "The database cannot answer."}}


@app.get("/metrics", response_model=MetricsPage, responses=UNAVAILABLE)
async def get_metrics(request: Request, query: Annotated[MetricsQuery, Query()]):
    """Return metrics grouped by `group_by`, filtered, sorted and paged, with totals.

    Example: `/metrics?start_date=2025-03-01&end_date=2025-03-31&platform=Instagram`
    `&group_by=week,device_type&sort=-cost&limit=10`
    """
    db: Database = request.app.state.db
    catalog = await db.current()
    sql, params, rows = statement(query, catalog, resolve_filters(query, catalog))
    lane = "heavy" if rows > HEAVY_ROWS else "light"
    [(data, totals, total_rows)] = await db.fetch(sql, params, lane)
    next_url, next_offset = None, query.offset + query.limit
    if next_offset < total_rows:  # the same query string, as the client wrote it
        given = request.scope["query_string"].decode("latin-1").split("&")
        kept = [p for p in given if unquote_plus(p.split("=")[0]) not in ("", "offset")]
        next_url = f"{request.url.path}?{'&'.join([*kept, f'offset={next_offset}'])}"
    paging = {"limit": query.limit, "offset": query.offset, "total_rows": total_rows}
    paging = json.dumps({**paging, "next": next_url}, separators=(",", ":")).encode()
    body = b'{"data":' + data + b',"totals":' + totals + b',"paging":' + paging + b"}"
    return Response(body, media_type="application/json")


@app.get("/dimensions", responses=UNAVAILABLE)
async def get_dimensions(request: Request) -> Response:
    """List each dimension's values, in their table's order, and the range of dates."""
    listing = (await request.app.state.db.current()).listing
    return Response(listing, media_type="application/json")


@app.get("/health")
async def health(request: Request) -> JSONResponse:
    """Report whether the database can be read, and the heartbeat's schedule and run."""
    scheduler, db = request.app.state.heartbeat.state(), request.app.state.db
    try:  # a file put in place while serving has no job_runs until the next run
        rows = await db.fetch("SELECT 1 FROM sqlite_master WHERE name = 'job_runs'", [])
        if rows:
            sql = "SELECT slot, ran_at FROM job_runs ORDER BY slot DESC LIMIT 1"
            rows = await db.fetch(sql, [])
    except Unavailable as e:
        body = {"status": "unavailable", "reason": str(e), "scheduler": scheduler}
        return JSONResponse(body, status_code=503)
    scheduler["last_run"] = dict(zip(("slot", "ran_at"), rows[0])) if rows else None
    return JSONResponse({"status": "ok", "scheduler": scheduler})


if __name__ == "__main__":
    if not os.path.exists(DB_PATH):
        import seed

        print(f"{DB_PATH} not found: seeding it", file=sys.stderr)
        if seed.main(["--db", DB_PATH]):
            sys.exit(2)
    uvicorn.run(app, host=HOST, port=PORT, log_level=LOG_LEVEL.lower())
