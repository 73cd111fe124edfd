"""Ad Metrics API: daily advertising metrics from a SQLite star schema. GET /metrics
filters, groups, sorts and pages them, with totals, as JSON or CSV; GET /dimensions
lists the names to filter by; GET /health reports on the data file and the heartbeat,
an async cron job that logs once every 6 hours across all workers.

Read top down: the contract (settings, models, routes), then the machinery (SQL, the
database, the heartbeat, start-up). README.md's "Design in brief" says how it works.
"""

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import sqlite3
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, date, datetime
from typing import Annotated, Literal, NamedTuple
from urllib.parse import quote, unquote_plus

import aiosqlite
import uvicorn
from aiosqlite import Connection
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError, ValidationError
from pydantic_core.core_schema import ValidationInfo

log = logging.getLogger("ad_metrics")
Level = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


# Settings ---------------------------------------------------------------------------
class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)  # fields set by their aliases only
    db_path: str = Field("ads.db", alias="ADS_DB")
    heartbeat_db: str = Field("heartbeat.db", alias="HEARTBEAT_DB")
    host: str = Field("127.0.0.1", alias="HOST")
    port: int = Field(8000, alias="PORT", ge=1, le=65535)
    heartbeat_interval: int = Field(21600, alias="HEARTBEAT_INTERVAL_SECONDS", ge=1)
    log_level: Level = Field("INFO", alias="LOG_LEVEL")
    # The whole time a request may spend waiting for a connection and running.
    query_timeout: float = Field(10, alias="QUERY_TIMEOUT_SECONDS", gt=0, le=3600)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Read the configuration once; a bad value stops start-up with one line."""
        level = env.get("LOG_LEVEL", "INFO").upper()
        try:
            return cls.model_validate({**env, "LOG_LEVEL": level})
        except ValidationError as e:
            error = e.errors()[0]
            line = f"{error['loc'][0]} {error['input']!r}: {error['msg']}"
            raise SystemExit(line) from None


# The request and response models ----------------------------------------------------
FACT = "fact_ad_metrics_daily"
DIMENSIONS = {  # API name -> (id column, dimension table, name column)
    "region": ("region_id", "dim_region", "region_name"),
    "age_group": ("age_id", "dim_age_group", "age_range"),
    "gender": ("gender_id", "dim_gender", "gender_name"),
    "platform": ("platform_id", "dim_platform", "platform_name"),
    "placement": ("placement_id", "dim_placement", "placement_name"),
    "device_type": ("device_type_id", "dim_device_type", "device_type_name"),
}
PERIODS = ["date", "week", "month"]
GROUP_FIELDS = [*PERIODS, *DIMENSIONS]
GRAIN = ["date", *DIMENSIONS]  # the default breakdown: one row per fact row
BASE_METRICS = ["impressions", "clicks", "cost", "conversions", "likes"]
RATIOS = ["ctr", "cpc", "cpm", "cpa", "conversion_rate"]
METRICS = BASE_METRICS + RATIOS
NAMES_HELP = "Only these names (see /dimensions), in any case; repeat or use commas."
GROUP_BY_HELP = "The breakdown: at most one of date, week, month; default: the grain."
SORT_HELP = "Output fields, '-' for descending; the group_by fields then break ties."
DimensionNames = dict[str, dict[str, str | None] | list[str]]  # GET /dimensions


class MetricsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start_date: date | None = Field(None, description="First day, YYYY-MM-DD.")
    end_date: date | None = Field(None, description="Last day, YYYY-MM-DD.")
    region: list[str] = Field(default_factory=list, description=NAMES_HELP)
    age_group: list[str] = Field(default_factory=list, description=NAMES_HELP)
    gender: list[str] = Field(default_factory=list, description=NAMES_HELP)
    platform: list[str] = Field(default_factory=list, description=NAMES_HELP)
    placement: list[str] = Field(default_factory=list, description=NAMES_HELP)
    device_type: list[str] = Field(default_factory=list, description=NAMES_HELP)
    group_by: list[Literal[*GROUP_FIELDS]] = Field(GRAIN, description=GROUP_BY_HELP)
    sort: list[str] = Field(default_factory=list, description=SORT_HELP)
    limit: int = Field(100, ge=1, le=1000, description="Rows; CSV: all if not given.")
    offset: int = Field(0, ge=0, le=2**63 - 1, description="Rows to skip.")
    format: Literal["json", "csv"] = Field("json", description="csv: the rows, a file.")

    @field_validator("end_date")
    @classmethod
    def end_after_start(cls, end: date | None, info: ValidationInfo) -> date | None:
        start = info.data.get("start_date")
        if start and end and end < start:
            message = f"end_date {end} is before start_date {start}"
            raise PydanticCustomError("value_error", message)
        return end

    @field_validator("group_by", mode="before")
    @classmethod
    def check_group_by(cls, values: list[str]) -> list[str]:
        fields = split(values)
        check_known("group_by", fields, GROUP_FIELDS, key=str)
        periods = [field for field in fields if field in PERIODS]
        if len(periods) > 1 or len(set(fields)) < len(fields):
            message = "group_by takes each field once, and one of date, week and month"
            raise PydanticCustomError("value_error", f"{message}, not {fields}")
        return fields

    @field_validator("sort")
    @classmethod
    def check_sort(cls, values: list[str], info: ValidationInfo) -> list[str]:
        items = split(values)
        valid = [*info.data.get("group_by", GROUP_FIELDS), *METRICS]
        check_known("sort", items, valid, key=lambda item: item.removeprefix("-"))
        return items


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    impressions: int
    clicks: int
    cost: float = Field(description="Rounded to cents.")
    conversions: int
    likes: int
    ctr: float | None = Field(description="clicks / impressions; null if 0 / 0")
    cpc: float | None = Field(description="cost / clicks")
    cpm: float | None = Field(description="1000 * cost / impressions")
    cpa: float | None = Field(description="cost / conversions")
    conversion_rate: float | None = Field(description="conversions / clicks")


# A group: its group_by fields (a week is its Monday; a name is null if its id is not
# in its table), then the metrics.
GROUPED = {field: (str | None, None) for field in GROUP_FIELDS}
Row = create_model("Row", __base__=Metrics, **GROUPED)


class Paging(BaseModel):
    limit: int
    offset: int
    total_rows: int = Field(description="Rows in the whole result, on all pages.")
    next: str | None = Field(description="The next page's URL; null on the last.")


class MetricsPage(BaseModel):
    data: list[Row]
    totals: Metrics = Field(description="Over every row that matches, not the page.")
    paging: Paging


# The routes -------------------------------------------------------------------------
NOT_MODIFIED = {304: {"description": "If-None-Match holds the current ETag."}}
UNAVAILABLE = {503: {"description": "The data cannot be read now; detail says why."}}
CSV_ANSWER = {200: {"content": {"text/csv": {}}}}
router = APIRouter(responses=UNAVAILABLE)


async def get_database(request: Request) -> "Database":
    return request.app.state.database


async def get_heartbeat(request: Request) -> "Heartbeat":
    return request.app.state.heartbeat


DatabaseDep = Annotated["Database", Depends(get_database)]
HeartbeatDep = Annotated["Heartbeat", Depends(get_heartbeat)]


@router.get("/metrics", response_model=MetricsPage, responses=CSV_ANSWER | NOT_MODIFIED)
async def get_metrics(
    request: Request, query: Annotated[MetricsQuery, Query()], db: DatabaseDep
) -> Response:
    """Return metrics grouped by `group_by`, filtered, sorted and paged, with totals."""
    async with db.reading() as (signature, catalog):
        filters = resolve_filters(query, catalog)
        headers = cache_headers(request, signature)  # a 304 here if the tag matches
        sql, params = metrics_sql(query, filters, catalog.dates_in_id_order)
        if query.format == "csv":  # without a limit, every row
            limit = query.limit if "limit" in query.model_fields_set else -1
            header = [*query.group_by, *METRICS]
            body = db.export(signature, sql, [*params, limit, query.offset], header)
            await anext(body)  # start the statement now, within the time limit
            headers["Content-Disposition"] = 'attachment; filename="metrics.csv"'
            return StreamingResponse(body, headers=headers, media_type="text/csv")
        params += [query.limit, query.offset]
        [(data, totals, total_rows)] = await db.fetch(signature, sql, params)
    paging = {"limit": query.limit, "offset": query.offset, "total_rows": total_rows}
    offset = query.offset + query.limit  # the next page: the same query, further on
    given = request.scope["query_string"].decode("latin-1").split("&")
    kept = [p for p in given if unquote_plus(p.split("=")[0]) not in ("", "offset")]
    url = f"{request.scope['path']}?{'&'.join([*kept, f'offset={offset}'])}"
    paging["next"] = url if offset < total_rows else None
    body = f'{{"data":{data},"totals":{totals},"paging":{json.dumps(paging)}}}'
    MetricsPage.model_validate_json(body)  # the answer holds to its model, or a 500
    return Response(body, media_type="application/json", headers=headers)


@router.get("/dimensions", response_model=DimensionNames, responses=NOT_MODIFIED)
async def get_dimensions(request: Request, response: Response, db: DatabaseDep):
    """List each dimension's names in their table's order, and the range of dates."""
    async with db.reading() as (signature, catalog):
        response.headers.update(cache_headers(request, signature))
    return catalog.dimensions


@router.get("/health")
async def health(db: DatabaseDep, heartbeat: HeartbeatDep) -> JSONResponse:
    """Say whether the data file can be read, and how the heartbeat is doing."""
    body = {"status": "ok", "scheduler": await heartbeat.state()}
    try:
        async with db.reading():
            pass
    except HTTPException as e:
        return JSONResponse(body | {"status": "unavailable", "reason": e.detail}, 503)
    return JSONResponse(body)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's standard 422 body, each message naming its parameter and value."""
    detail = jsonable_encoder(e.errors())
    for error in detail:
        name = str(error["loc"][-1])
        if not error["msg"].startswith(name):  # pydantic's words: say who and what
            error["msg"] = f"{name} {str(error.get('input'))[:60]!r}: {error['msg']}"
    return JSONResponse({"detail": detail}, status_code=422)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    # The server logs the traceback; the client learns only that the fault is ours.
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


def cache_headers(request: Request, signature: "Signature") -> dict[str, str]:
    """Tag the answer by the file's signature and the request; 304 if it matches."""
    asked = request.scope["path"].encode() + b"?" + request.scope["query_string"]
    key = f"{signature} ".encode() + asked
    if not signature.settled():  # a tag of its own, which no later request matches
        key += os.urandom(16)
    tag = f'"{hashlib.blake2b(key, digest_size=16).hexdigest()}"'
    headers = {"ETag": tag, "Cache-Control": "no-cache"}  # always revalidate
    given = request.headers.get("if-none-match", "").split(",")
    if any(t.strip().removeprefix("W/") in (tag, "*") for t in given):
        raise HTTPException(304, headers=headers)
    return headers


def split(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",")]


def check_known(name: str, items: list[str], valid: list[str], key=str.casefold):
    """Raise an error for the first item that is empty or unknown."""
    known = {key(v) for v in valid}
    for item in items:
        if not item:
            raise PydanticCustomError("string_too_short", f"{name} has an empty value")
        if key(item) not in known:
            message = f"{name} {item[:60]!r} is not one of: {', '.join(valid)}"
            raise PydanticCustomError("literal_error", message)


def resolve_filters(query: MetricsQuery, catalog: "Catalog") -> dict[str, list[int]]:
    """Each filter's names as ids (a known name whole, else split on commas); or 422."""
    filters = {}
    for dim in DIMENSIONS:
        values, ids, names = getattr(query, dim), catalog.ids[dim], []
        for value in values:
            whole = value.strip().casefold() in ids
            names += [value.strip()] if whole else split([value])
        try:
            check_known(dim, names, catalog.dimensions[dim])
        except PydanticCustomError as e:
            error = {"type": e.type, "loc": ("query", dim), "msg": e.message()}
            raise RequestValidationError([error | {"input": values}]) from None
        if names:
            filters[dim] = [i for name in names for i in ids[name.casefold()]]
    return filters


# How a query becomes SQL ------------------------------------------------------------
# Identifiers come only from the tables above; every value is a parameter.
NAMED = {"date": ("date_id", "dim_date", "date_value"), **DIMENSIONS}
KEYS = {f: c for f, (c, _, _) in NAMED.items()} | {"week": "week", "month": "month"}
# A group_by field's value in page row p; a name by a scalar subquery: no row doubled.
LABELS = {"week": "p.week", "month": "p.month"} | {
    field: f"(SELECT CAST({name} AS TEXT) FROM {table} WHERE {column} = p.{column})"
    for field, (column, table, name) in NAMED.items()
}
DATE_OF = "(SELECT date_value FROM dim_date WHERE date_id = {}.date_id)"  # of a row
WEEK_OR_MONTH = {
    "week": f"date({DATE_OF.format('d')}, 'weekday 0', '-6 days')",
    "month": f"substr({DATE_OF.format('d')}, 1, 7)",
}
# Each metric of a row or of the totals, from their sums; a null counts as 0.
OUTPUT = {m: f"CAST(coalesce({m}, 0) AS INTEGER)" for m in BASE_METRICS} | {
    "cost": "round(coalesce(cost, 0), 2)",
    "ctr": "round(1.0 * coalesce(clicks, 0) / nullif(impressions, 0), 6)",
    "cpc": "round(1.0 * coalesce(cost, 0) / nullif(clicks, 0), 6)",
    "cpm": "round(1000.0 * coalesce(cost, 0) / nullif(impressions, 0), 6)",
    "cpa": "round(1.0 * coalesce(cost, 0) / nullif(conversions, 0), 6)",
    "conversion_rate": "round(1.0 * coalesce(conversions, 0) / nullif(clicks, 0), 6)",
}
SUMS = ", ".join(f"sum({m}) AS {m}" for m in BASE_METRICS)
PAGE_METRICS = ", ".join(f"{OUTPUT[m]} AS {m}" for m in METRICS)
TOTALS = ", ".join(f"'{m}', {OUTPUT[m]}" for m in METRICS)
# For group_by=month,region&region=Africa&sort=-cost, the JSON answer's statement is
#   WITH groups AS MATERIALIZED (<each month and region: the sums of its days' sums>),
#   page AS (SELECT month, region_id, <the ten metrics> FROM groups
#            ORDER BY cost DESC NULLS LAST, month, region_id LIMIT ? OFFSET ?)
#   SELECT (SELECT json_group_array(json_object('month', p.month, 'region', <its name>,
#           'impressions', p.impressions, ...)) FROM page AS p),
#          json_object(<the totals' ten metrics>), total_rows
#   FROM (SELECT count(*) AS total_rows, <the sums of all groups> FROM groups)
PAGE_SQL = """WITH groups AS {groups},
page AS (SELECT {keys}, {metrics} FROM groups ORDER BY {order} LIMIT ? OFFSET ?)"""
JSON_SQL = """{page}
SELECT (SELECT json_group_array(json_object({row})) FROM page AS p),
       json_object({totals}), total_rows
FROM (SELECT count(*) AS total_rows, {sums} FROM groups)"""


def metrics_sql(query: MetricsQuery, filters: dict, dates_in_id_order: bool):
    """The statement that answers a query, and its parameters but LIMIT and OFFSET."""
    where, params = [], []
    if query.start_date or query.end_date:  # a date not in dim_date is in no range
        days = "SELECT date_id FROM dim_date WHERE date_value BETWEEN ? AND ?"
        where.append(f"date_id IN ({days})")
        params += [str(query.start_date or date.min), str(query.end_date or date.max)]
    for dim, ids in filters.items():  # a placeholder per id: SQLite seeks on each
        where.append(f"{DIMENSIONS[dim][0]} IN ({', '.join(['?'] * len(ids))})")
        params += ids
    page = PAGE_SQL.format(
        groups=groups_sql(query.group_by, " AND ".join(where)),
        keys=", ".join(KEYS[field] for field in query.group_by),
        metrics=PAGE_METRICS,
        order=order_sql(query.group_by, query.sort, dates_in_id_order),
    )
    if query.format == "csv":  # the page's rows; numbers as text, as JSON writes them
        labels = ", ".join(LABELS[field] for field in query.group_by)
        numbers = ", ".join(f"CAST(p.{m} AS TEXT)" for m in METRICS)
        return f"{page} SELECT {labels}, {numbers} FROM page AS p", params
    row = [f"'{f}', {LABELS[f]}" for f in query.group_by]
    row += [f"'{m}', p.{m}" for m in METRICS]
    sql = JSON_SQL.format(page=page, row=", ".join(row), totals=TOTALS, sums=SUMS)
    return sql, params


def groups_sql(fields: list[str], where: str) -> str:
    """Each group's keys and sums, kept (MATERIALIZED) or read as needed (NOT)."""
    keys = ", ".join(KEYS[field] for field in fields)
    facts = f"{FACT} WHERE {where}" if where else FACT
    if set(fields) == set(GRAIN):  # each fact row is a group: nothing to add up
        # Read in the table's key order, a page stops at its last row.
        values = ", ".join(BASE_METRICS)
        return f"NOT MATERIALIZED (SELECT {keys}, {values} FROM {facts})"
    period = next((field for field in fields if field in WEEK_OR_MONTH), None)
    if period is None:
        return f"MATERIALIZED (SELECT {keys}, {SUMS} FROM {facts} GROUP BY {keys})"
    # A week or a month adds up its days' sums: a few rows a day, not every fact.
    day_keys = ", ".join(KEYS[f] for f in ["date", *fields] if f != period)
    days = f"SELECT {day_keys}, {SUMS} FROM {facts} GROUP BY {day_keys}"
    outer = [f"{WEEK_OR_MONTH[f]} AS {f}" if f == period else KEYS[f] for f in fields]
    sql = f"SELECT {', '.join(outer)}, {SUMS} FROM ({days}) AS d GROUP BY {keys}"
    return f"MATERIALIZED ({sql})"


def order_sql(fields: list[str], sort: list[str], dates_in_id_order: bool) -> str:
    """The sort, then group_by: names by id, dates in time, metrics null last."""
    named = {item.removeprefix("-") for item in sort}
    terms = []
    for item in [*sort, *(field for field in fields if field not in named)]:
        field = item.removeprefix("-")
        way = " DESC" if item.startswith("-") else ""
        if field in METRICS:
            terms.append(f"{field}{way} NULLS LAST")
        elif field == "date" and not dates_in_id_order:
            terms.append(f"{DATE_OF.format('groups')}{way}, date_id{way}")
        else:
            terms.append(f"{KEYS[field]}{way}")
    return ", ".join(terms)


# The database -----------------------------------------------------------------------
STATEMENTS = 32  # running at once, each in its connection's thread, sharing the cores
DOWNLOADS = 8  # CSV downloads at once, each holding a connection until it ends
CHUNK = 1000  # the rows a download reads at a time
# The fact table has our columns, or the error names the one it lacks.
FACT_COLUMNS = [KEYS[field] for field in GRAIN]
FACT_SQL = f"SELECT {', '.join(FACT_COLUMNS + BASE_METRICS)} FROM {FACT} LIMIT 0"
# Every (field, id, name) of the dimension tables, in id order; a null name is none.
CATALOG = [
    f"SELECT '{f}', {c}, CAST({n} AS TEXT) FROM {t} WHERE {n} IS NOT NULL"
    for f, (c, t, n) in NAMED.items()
]
CATALOG_SQL = " UNION ALL ".join(CATALOG) + " ORDER BY 1, 2"
Stamp = namedtuple("Stamp", ["device", "inode", "size", "mtime_ns"])  # from os.stat


class Signature(NamedTuple):
    file: Stamp  # what os.stat says of the data file: which it is, and its last write
    wal: Stamp | None  # the same of its -wal, if there is one

    def settled(self) -> bool:
        """Whether nothing was written for 100 ms: then any later write changes it."""
        newest = max(self.file.mtime_ns, self.wal.mtime_ns if self.wal else 0)
        return time.time_ns() - newest > 100_000_000


class Catalog(NamedTuple):
    signature: Signature  # of the file it was read from
    ids: dict[str, dict[str, list[int]]]  # dimension -> folded name -> its ids
    dimensions: DimensionNames  # the answer of GET /dimensions
    dates_in_id_order: bool  # then date_id sorts by date, in the table's key order


def stamp(path: str) -> Stamp | None:
    with contextlib.suppress(FileNotFoundError):  # no file: no stamp
        st = os.stat(path)
        return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return None


def primary_code(error: sqlite3.Error) -> int:
    """SQLite's primary result code (SQLITE_BUSY_RECOVERY is SQLITE_BUSY), or 0."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF


class Database:
    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.uri = f"file:{quote(os.path.abspath(path))}?mode=ro"  # never creates it
        self.statement_slots = asyncio.Semaphore(STATEMENTS)
        self.download_slots = asyncio.Semaphore(DOWNLOADS)
        self.idle: list[tuple[tuple, Connection]] = []  # (file id, conn)
        self.kept: Catalog | None = None  # the catalog of a settled signature

    def signature(self) -> Signature:
        data_file = stamp(self.path)
        if data_file is None:
            raise HTTPException(503, f"database {self.path} is missing")
        return Signature(data_file, stamp(self.path + "-wal"))

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[tuple[Signature, Catalog]]:
        """Signature and catalog, for reads within the time limit; past it, a 503."""
        try:
            async with asyncio.timeout(self.timeout):
                signature = self.signature()
                yield signature, await self.catalog(signature)
        except TimeoutError:
            stopped = f"the query took longer than {self.timeout:g} s and was stopped"
            advice = "narrow the date range, add filters or group by fewer fields"
            raise HTTPException(503, f"{stopped}; {advice}") from None

    async def catalog(self, signature: Signature) -> Catalog:
        """The file's names and dates: kept, or read again (and kept once settled)."""
        if self.kept and self.kept.signature == signature:
            return self.kept
        await self.fetch(signature, FACT_SQL)
        rows = await self.fetch(signature, CATALOG_SQL)
        dates = [value for field, _, value in rows if field == "date"]
        ids, names = {dim: {} for dim in DIMENSIONS}, {dim: [] for dim in DIMENSIONS}
        for dim, i, name in rows:  # a name stands for each of its ids, in any case
            if dim != "date":
                ids[dim].setdefault(name.casefold(), []).append(i)
                names[dim] += [] if name in names[dim] else [name]
        span = {"first": min(dates, default=None), "last": max(dates, default=None)}
        dimensions = {"date": span} | names
        catalog = Catalog(signature, ids, dimensions, dates == sorted(dates))
        if signature.settled():
            self.kept = catalog
        return catalog

    async def fetch(self, signature: Signature, sql: str, params=()) -> list:
        async with self.connection(signature) as conn:
            return await self.retry_busy(lambda: conn.execute_fetchall(sql, params))

    async def export(self, signature: Signature, sql: str, params: list, header: list):
        """Yield "" once the statement has started on a lent connection, then the header
        and the rows as CSV (RFC 4180; null is an empty field), CHUNK rows at a time."""
        if self.download_slots.locked():
            busy = f"{DOWNLOADS} downloads are under way; retry later"
            raise HTTPException(503, busy)
        async with self.download_slots, self.connection(signature) as conn:
            cursor = await self.retry_busy(lambda: conn.execute(sql, params))
            rows = [header, *await cursor.fetchmany(CHUNK)]
            yield ""  # the caller can now start the answer
            while rows:  # to the end, unless the client leaves: then it is interrupted
                out = io.StringIO()
                csv.writer(out, lineterminator="\r\n").writerows(rows)
                yield out.getvalue()
                rows = await cursor.fetchmany(CHUNK)

    @contextlib.asynccontextmanager
    async def connection(self, signature: Signature) -> AsyncIterator[Connection]:
        """Lend a connection to the file of this signature. It is reused only if its
        statement ended well; else it is interrupted and closed, reaching no other."""
        file_id = signature.file.device, signature.file.inode
        async with self.statement_slots:
            opened_on, conn = self.idle.pop() if self.idle else (None, None)
            if opened_on != file_id:  # none idle, or one opened on another file
                if conn:
                    await conn.close()
                try:
                    conn = await aiosqlite.connect(self.uri, uri=True, timeout=0)
                except sqlite3.Error as e:
                    raise self.unreadable(e) from None
            try:
                yield conn
            except BaseException:  # time is up, the client left, or the file failed
                await conn.interrupt()
                await conn.close()
                raise
            self.idle.append((file_id, conn))

    async def retry_busy(self, statement):
        """Await a statement; again every 50 ms while another process writes."""
        while True:
            try:
                return await statement()
            except sqlite3.Error as e:
                if not primary_code(e):  # not the file's error but ours: a 500
                    raise
                if primary_code(e) != sqlite3.SQLITE_BUSY:
                    raise self.unreadable(e) from None
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop()[1].close()

    def unreadable(self, reason: object) -> HTTPException:
        return HTTPException(503, f"database {self.path} cannot be read: {reason}")


# The heartbeat ----------------------------------------------------------------------
JOB_RUNS_SQL = """CREATE TABLE IF NOT EXISTS job_runs
    (slot TEXT PRIMARY KEY, ran_at TEXT NOT NULL, pid INTEGER NOT NULL)"""
CLAIM_SQL = "INSERT INTO job_runs VALUES (?, ?, ?) ON CONFLICT (slot) DO NOTHING"
LAST_RUN_SQL = "SELECT slot, ran_at FROM job_runs ORDER BY slot DESC LIMIT 1"


class Heartbeat:
    """The async cron job: at each slot of a UTC grid, the worker that first claims
    the slot (a row in HEARTBEAT_DB) logs the heartbeat; the others log nothing."""

    def __init__(self, path: str, interval: int) -> None:
        self.path, self.interval = path, interval
        self.uri = f"file:{quote(os.path.abspath(path))}?mode=ro"  # for state()
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.claiming = asyncio.Lock()  # held while a run claims its slot
        self.stopping = False
        # A grid from the epoch, whatever the restarts; a cron field can't say "7 h".
        self.scheduler.add_job(
            self.run,
            IntervalTrigger(seconds=interval, start_date=self.slot_at(0)),
            id="heartbeat",
            next_run_time=self.slot_at(time.time()),  # the latest slot, at once
            coalesce=True,
            max_instances=1,
            misfire_grace_time=interval,  # late is fine, until the next slot
        )

    def slot_at(self, timestamp: float) -> datetime:
        return datetime.fromtimestamp(timestamp // self.interval * self.interval, UTC)

    async def run(self) -> None:
        """Claim the current slot; the process that wins logs the heartbeat."""
        now = time.time()
        slot = self.slot_at(now).isoformat()
        ran_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        # Give up half a second before the next slot is due, so that it is not skipped.
        deadline = self.slot_at(now).timestamp() + self.interval - 0.5
        async with self.claiming:
            try:
                won = await self.claim([slot, ran_at, os.getpid()], deadline)
            except Exception:
                log.exception("heartbeat slot=%s failed", slot)
                return
        if won is None:  # the server stopped before the claim could be made
            log.warning("heartbeat slot=%s not recorded: the server is stopping", slot)
        elif won:
            log.info("heartbeat slot=%s ran_at=%s", slot, ran_at)

    async def claim(self, row: list, deadline: float) -> bool | None:
        """Insert the slot's row: True if we did, False if it was; None if stopping."""
        while not self.stopping:
            try:
                async with aiosqlite.connect(self.path, timeout=0.05) as db:
                    await db.execute(JOB_RUNS_SQL)
                    cursor = await db.execute(CLAIM_SQL, row)
                    await db.commit()
                    return cursor.rowcount == 1
            except sqlite3.OperationalError as e:
                if primary_code(e) != sqlite3.SQLITE_BUSY or time.time() > deadline:
                    raise
            await asyncio.sleep(0.2)  # another worker holds the lock: wait, in the loop
        return None

    async def stop(self) -> None:
        """Stop scheduling; a run in progress ends its attempt and says so."""
        self.stopping = True
        self.scheduler.pause()
        await asyncio.sleep(0)  # a run started just now gets to see `stopping`
        async with self.claiming:  # then no run is left for the shutdown to cancel
            self.scheduler.shutdown(wait=False)

    async def state(self) -> dict:
        job, last_run, now = self.scheduler.get_job("heartbeat"), None, time.time()
        with contextlib.suppress(sqlite3.Error):  # no file or no table yet: no run
            async with aiosqlite.connect(self.uri, uri=True, timeout=1) as db:
                for slot, ran_at in await db.execute_fetchall(LAST_RUN_SQL):
                    last_run = {"slot": slot, "ran_at": ran_at}
        latest = self.slot_at(now)  # overdue: it has had no run for over a minute
        ran = last_run is not None and last_run["slot"] >= latest.isoformat()
        return {
            "running": self.scheduler.running,
            "interval_seconds": self.interval,
            "next_run_at": job.next_run_time.isoformat() if job else None,
            "last_run": last_run,
            "overdue": not ran and now - latest.timestamp() > 60,
        }


# Start-up ---------------------------------------------------------------------------
class StartupError(Exception):
    """Keeps the service from starting; the message says what to do."""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    # Start-up: check that the data file can be served, then start the heartbeat.
    logging.basicConfig(format="%(levelname)s:     %(name)s[%(process)d] %(message)s")
    log.setLevel(settings.log_level)
    if sqlite3.sqlite_version_info < (3, 35):  # for MATERIALIZED and NULLS LAST
        raise StartupError(f"SQLite 3.35+ is needed, not {sqlite3.sqlite_version}")
    if not os.path.exists(settings.db_path):
        create = f"create it with: python seed.py --db {settings.db_path}"
        raise StartupError(f"database {settings.db_path} not found; {create}")
    database = Database(settings.db_path, settings.query_timeout)
    try:
        async with database.reading():  # waiting while another process writes
            pass
    except HTTPException as e:
        await database.close()
        raise StartupError(e.detail) from None
    heartbeat = Heartbeat(settings.heartbeat_db, settings.heartbeat_interval)
    heartbeat.scheduler.start()
    app.state.database, app.state.heartbeat = database, heartbeat
    yield
    # Shutdown: let a heartbeat run end its attempt, then close the connections.
    await heartbeat.stop()
    await database.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    handlers = {RequestValidationError: validation_error, Exception: internal_error}
    app = FastAPI(
        title="Ad Metrics API", lifespan=lifespan, exception_handlers=handlers
    )
    app.state.settings = settings or Settings.from_env(os.environ)
    app.include_router(router)
    return app


app = create_app()

if __name__ == "__main__":
    settings = app.state.settings
    if not os.path.exists(settings.db_path):
        import seed

        seed.main(["--db", settings.db_path])
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # On SIGTERM, a request has the query time limit to end: a stalled download too.
        timeout_graceful_shutdown=int(settings.query_timeout) + 1,
    )
