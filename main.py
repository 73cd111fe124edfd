"""Ad Metrics API: daily advertising metrics from a SQLite star schema.

GET /metrics filters, groups, sorts and pages the metrics, with totals, as JSON or CSV;
GET /dimensions lists the values to filter by; GET /health reports on the data file and
on the heartbeat, an async job that logs one run per 6-hour UTC slot across workers.

Read top down: the contract (settings, models, routes), then the machinery (SQL, the
database, the heartbeat, start-up). The data file is only ever read; what the service
remembers of it is keyed on its signature, taken once a request; a connection is
checked when it is lent, and closed when in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Literal
from urllib.parse import quote, unquote_plus

import aiosqlite
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError, ValidationError

log = logging.getLogger("ad_metrics")

# Settings ---------------------------------------------------------------------------

Level = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Settings(BaseModel):
    """The configuration, read once from the environment by `from_env`."""

    model_config = ConfigDict(frozen=True, validate_by_name=True)
    db_path: str = Field("ads.db", alias="ADS_DB")
    heartbeat_db: str = Field("heartbeat.db", alias="HEARTBEAT_DB")
    host: str = Field("127.0.0.1", alias="HOST")
    port: int = Field(8000, alias="PORT", ge=1, le=65535)
    heartbeat_interval: int = Field(21600, alias="HEARTBEAT_INTERVAL_SECONDS", ge=1)
    log_level: Level = Field("INFO", alias="LOG_LEVEL")
    # The whole time a request may spend waiting for a connection and running.
    query_timeout: float = Field(10, alias="QUERY_TIMEOUT_SECONDS", gt=0, le=3600)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read the documented variables, or stop with one line naming a bad one."""
        names = [field.alias for field in cls.model_fields.values()]
        values = {name: env[name] for name in names if name in env}
        if "LOG_LEVEL" in values:
            values["LOG_LEVEL"] = values["LOG_LEVEL"].upper()
        try:
            return cls.model_validate(values)
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
NAMES = "Keep only these names (see /dimensions), in any case; repeat or use commas."


class MetricsQuery(BaseModel):
    """The query parameters of GET /metrics."""

    model_config = ConfigDict(extra="forbid")
    start_date: date | None = Field(None, description="First day, YYYY-MM-DD.")
    end_date: date | None = Field(None, description="Last day, YYYY-MM-DD.")
    region: list[str] = Field(default_factory=list, description=NAMES)
    age_group: list[str] = Field(default_factory=list, description=NAMES)
    gender: list[str] = Field(default_factory=list, description=NAMES)
    platform: list[str] = Field(default_factory=list, description=NAMES)
    placement: list[str] = Field(default_factory=list, description=NAMES)
    device_type: list[str] = Field(default_factory=list, description=NAMES)
    group_by: list[Literal[*GROUP_FIELDS]] = Field(
        default_factory=lambda: list(GRAIN),
        description="The breakdown; at most one of date, week and month.",
    )
    sort: list[str] = Field(
        default_factory=list,
        description="Output fields, '-' for descending; then group_by breaks ties.",
    )
    limit: int = Field(100, ge=1, le=1000, description="Rows per page; CSV: all rows.")
    offset: int = Field(0, ge=0, le=2**63 - 1, description="Rows to skip.")
    format: Literal["json", "csv"] = Field("json", description="csv: the rows, a file.")

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def real_date(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and not iso_date(value):
            message = f"{info.field_name} {shorten(value)} is no YYYY-MM-DD date"
            raise PydanticCustomError("date_parsing", message)
        return value

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
        check("group_by", fields, GROUP_FIELDS, key=str)
        periods = [field for field in fields if field in PERIODS]
        if len(periods) > 1:
            message = f"group_by takes one of date, week and month, not {periods}"
            raise PydanticCustomError("value_error", message)
        return fields

    @field_validator("sort")
    @classmethod
    def check_sort(cls, values: list[str], info: ValidationInfo) -> list[str]:
        items = split(values)
        valid = [*info.data.get("group_by", GROUP_FIELDS), *METRICS]
        check("sort", items, valid, key=lambda item: item.removeprefix("-"))
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


class Row(Metrics):
    """A group: its group_by fields (a name is null if its id is not in its table)."""

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
    total_rows: int = Field(description="Rows in the whole result, on all pages.")
    next: str | None = Field(description="The next page's URL; null on the last.")


class MetricsPage(BaseModel):
    data: list[Row]
    totals: Metrics = Field(description="Over every row that matches, not the page.")
    paging: Paging


class Dimensions(BaseModel):
    date: dict[str, str | None] = Field(description="The first and the last date.")
    region: list[str]
    age_group: list[str]
    gender: list[str]
    platform: list[str]
    placement: list[str]
    device_type: list[str]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = Field(None, description="Why the data cannot be read.")
    scheduler: dict = Field(description="The heartbeat's schedule and latest run.")


# The routes -------------------------------------------------------------------------

router = APIRouter()


async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_heartbeat(request: Request) -> Heartbeat:
    return request.app.state.heartbeat


DatabaseDep = Annotated["Database", Depends(get_database)]
HeartbeatDep = Annotated["Heartbeat", Depends(get_heartbeat)]
NOT_MODIFIED = {304: {"description": "If-None-Match holds the current ETag."}}
UNAVAILABLE = {503: {"description": "The data cannot be read now; detail says why."}}
CSV = {200: {"content": {"text/csv": {}}}}


@router.get("/metrics", response_model=MetricsPage, responses=CSV | NOT_MODIFIED)
async def get_metrics(
    request: Request, query: Annotated[MetricsQuery, Query()], db: DatabaseDep
) -> Response:
    """Return metrics grouped by `group_by`, filtered, sorted and paged, with totals."""
    async with db.time_limit():
        file = db.signature()
        catalog = await db.catalog(file)
        filters = resolve_filters(query, catalog)
        headers = cache_headers(request, file)  # or a 304 now, with no query run
        sql, params = metrics_sql(query, filters, catalog.dates_in_id_order)
        if query.format == "csv":
            limit = query.limit if "limit" in query.model_fields_set else -1  # all
            rows = db.export(file, sql, [*params, limit, query.offset])
            return csv_response(query, await anext(rows), rows, headers)
        params += [query.limit, query.offset]
        [(data, totals, total_rows)] = await db.fetch(file, sql, params)
    paging = {"limit": query.limit, "offset": query.offset, "total_rows": total_rows}
    paging["next"] = next_page(request, query, total_rows)
    paging = json.dumps(paging, separators=(",", ":"))
    body = f'{{"data":{data},"totals":{totals},"paging":{paging}}}'
    MetricsPage.model_validate_json(body)  # the answer holds to its model, or a 500
    return Response(body, media_type="application/json", headers=headers)


@router.get("/dimensions", response_model=Dimensions, responses=NOT_MODIFIED)
async def get_dimensions(request: Request, response: Response, db: DatabaseDep):
    """List each dimension's names in their table's order, and the range of dates."""
    async with db.time_limit():
        file = db.signature()
        catalog = await db.catalog(file)
    response.headers.update(cache_headers(request, file))
    return catalog.dimensions


@router.get("/health", response_model=Health, response_model_exclude_none=True)
async def health(response: Response, db: DatabaseDep, heartbeat: HeartbeatDep):
    """Say whether the data file can be read, and how the heartbeat is doing."""
    scheduler = await heartbeat.state()
    try:
        async with db.time_limit():
            await db.catalog(db.signature())
    except HTTPException as e:
        response.status_code = e.status_code
        return Health(status="unavailable", reason=e.detail, scheduler=scheduler)
    return Health(status="ok", scheduler=scheduler)


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's standard 422 body, each message naming its parameter and value."""
    detail = jsonable_encoder(error.errors())
    for e in detail:
        name = str(e["loc"][-1])
        if not e["msg"].startswith(name):  # pydantic's own words: say who and what
            e["msg"] = f"{name} {shorten(str(e.get('input')))}: {e['msg']}"
    return JSONResponse({"detail": detail}, status_code=422)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    # The server logs the traceback; the client learns only that the fault is ours.
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


class Unavailable(HTTPException):
    """The data cannot be read now: a 503 whose detail says why and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


def cache_headers(request: Request, file: Signature) -> dict[str, str]:
    """Tag the answer by the file's signature and the request; 304 if it matches."""
    key = f"{file} {request.scope['path']}?".encode() + request.scope["query_string"]
    if not file.settled():  # this answer's own tag, which no later request matches
        key += os.urandom(16)
    tag = f'"{hashlib.blake2b(key, digest_size=16).hexdigest()}"'
    headers = {"ETag": tag, "Cache-Control": "no-cache"}  # always revalidate
    given = request.headers.get("if-none-match", "").split(",")
    if any(t.strip().removeprefix("W/") in (tag, "*") for t in given):
        raise HTTPException(304, headers=headers)
    return headers


def next_page(request: Request, query: MetricsQuery, total_rows: int) -> str | None:
    """The next page's URL: the client's own query string with a new offset."""
    offset = query.offset + query.limit
    if offset >= total_rows:
        return None
    given = request.scope["query_string"].decode("latin-1").split("&")
    kept = [p for p in given if unquote_plus(p.split("=")[0]) not in ("", "offset")]
    return f"{request.scope['path']}?{'&'.join([*kept, f'offset={offset}'])}"


def csv_response(query: MetricsQuery, first: list, rest, headers: dict):
    """The rows as a CSV download (RFC 4180; null is an empty field), streamed."""

    async def text() -> AsyncIterator[str]:
        rows = [[*query.group_by, *METRICS], *first]
        try:
            while rows:
                out = io.StringIO()
                csv.writer(out, lineterminator="\r\n").writerows(rows)
                yield out.getvalue()
                rows = await anext(rest, None)
        finally:  # also when the client leaves: the statement stops
            await rest.aclose()

    headers["Content-Disposition"] = 'attachment; filename="metrics.csv"'
    return StreamingResponse(text(), media_type="text/csv", headers=headers)


def shorten(value: str) -> str:
    """Quote a client's value for a message, cut to a readable length."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


def iso_date(value: object) -> date | None:
    """The date that value writes as YYYY-MM-DD; None if it is no such text."""
    if isinstance(value, str) and len(value) == 10 and value[4] == value[7] == "-":
        with contextlib.suppress(ValueError):
            return date.fromisoformat(value)
    return None


def split(values: list[str]) -> list[str]:
    """Repeated and comma-separated values, as one list."""
    return [item.strip() for value in values for item in value.split(",")]


def check(name: str, items: list[str], valid: list[str], key=str.casefold) -> None:
    """Raise an error for the first item that is empty, unknown or repeated."""
    known, seen = {key(v) for v in valid}, set()
    for item in items:
        if not item:
            raise PydanticCustomError("string_too_short", f"{name} has an empty value")
        if key(item) not in known:
            message = f"{name} {shorten(item)} is not one of: {', '.join(valid)}"
            raise PydanticCustomError("literal_error", message)
        if key(item) in seen:
            message = f"{name} lists {shorten(item)} more than once"
            raise PydanticCustomError("value_error", message)
        seen.add(key(item))


def resolve_filters(query: MetricsQuery, catalog: Catalog) -> dict[str, list[int]]:
    """Each filter's names as ids, or a 422 naming each filter's first bad value.
    Values are split on commas, but a value that is a known name is taken whole."""
    filters, errors = {}, []
    for dim in DIMENSIONS:
        values, ids = getattr(query, dim), catalog.ids[dim]
        names = []
        for value in values:
            whole = value.strip().casefold() in ids
            names += [value.strip()] if whole else split([value])
        try:
            check(dim, names, getattr(catalog.dimensions, dim))
        except PydanticCustomError as e:
            loc, msg = ("query", dim), e.message()
            errors.append({"type": e.type, "loc": loc, "msg": msg, "input": values})
            continue
        if names:
            filters[dim] = [i for name in names for i in ids[name.casefold()]]
    if errors:
        raise RequestValidationError(errors)
    return filters


# How a query becomes SQL ------------------------------------------------------------
# Identifiers come only from the tables above; every value is a parameter.

KEYS = {"date": "date_id", "week": "week", "month": "month"} | {
    dim: column for dim, (column, _, _) in DIMENSIONS.items()
}
# A group_by field's value in a page row p. A name comes by a scalar subquery, which
# can never double a row, whatever keys the user's tables declare.
LABELS = {
    "date": "(SELECT date_value FROM dim_date WHERE date_id = p.date_id)",
    "week": "p.week",
    "month": "p.month",
} | {
    dim: f"(SELECT CAST({name} AS TEXT) FROM {table} WHERE {column} = p.{column})"
    for dim, (column, table, name) in DIMENSIONS.items()
}
DAY = "(SELECT date_value FROM dim_date WHERE date_id = d.date_id)"
WEEK_OR_MONTH = {  # of a day d
    "week": f"date({DAY}, 'weekday 0', '-6 days')",  # its Monday
    "month": f"substr({DAY}, 1, 7)",
}
# Each metric of a row or of the totals, from their sums.
OUTPUT = {
    "impressions": "CAST(impressions AS INTEGER)",
    "clicks": "CAST(clicks AS INTEGER)",
    "cost": "round(cost, 2)",
    "conversions": "CAST(conversions AS INTEGER)",
    "likes": "CAST(likes AS INTEGER)",
    "ctr": "round(1.0 * clicks / nullif(impressions, 0), 6)",
    "cpc": "round(1.0 * cost / nullif(clicks, 0), 6)",
    "cpm": "round(1000.0 * cost / nullif(impressions, 0), 6)",
    "cpa": "round(1.0 * cost / nullif(conversions, 0), 6)",
    "conversion_rate": "round(1.0 * conversions / nullif(clicks, 0), 6)",
}
SUMS = ", ".join(f"coalesce(sum({m}), 0) AS {m}" for m in BASE_METRICS)  # null: 0

# The groups, and a page of them in order with their metrics.
PAGE_SQL = """WITH groups AS {materialized} ({groups}),
page AS (SELECT {keys}, {metrics} FROM groups ORDER BY {order} LIMIT ? OFFSET ?)"""
# The JSON answer in one row: the page, the totals and the number of groups.
JSON_SQL = """{page}
SELECT (SELECT json_group_array(json_object({row})) FROM page AS p),
       json_object({totals}), total_rows
FROM (SELECT count(*) AS total_rows, {sums} FROM groups)"""
# The CSV answer: the page's rows, numbers written as in JSON (0.493256, where
# Python would write the same double as 0.49325600000000003).
CSV_SQL = "{page} SELECT {labels}, {numbers} FROM page AS p"


def metrics_sql(query: MetricsQuery, filters: dict, dates_in_id_order: bool):
    """The statement that answers a query, and its parameters but LIMIT and OFFSET."""
    where, params = where_sql(query, filters)
    groups, materialized = groups_sql(query.group_by, where)
    page = PAGE_SQL.format(
        materialized=materialized,
        groups=groups,
        keys=", ".join(KEYS[field] for field in query.group_by),
        metrics=", ".join(f"{OUTPUT[m]} AS {m}" for m in METRICS),
        order=order_sql(query.group_by, query.sort, dates_in_id_order),
    )
    if query.format == "csv":
        labels = ", ".join(LABELS[field] for field in query.group_by)
        numbers = ", ".join(f"CAST(p.{m} AS TEXT)" for m in METRICS)
        return CSV_SQL.format(page=page, labels=labels, numbers=numbers), params
    row = [f"'{f}', {LABELS[f]}" for f in query.group_by]
    row += [f"'{m}', p.{m}" for m in METRICS]
    totals = ", ".join(f"'{m}', {OUTPUT[m]}" for m in METRICS)
    sql = JSON_SQL.format(page=page, row=", ".join(row), totals=totals, sums=SUMS)
    return sql, params


def where_sql(query: MetricsQuery, filters: dict) -> tuple[str, list]:
    """The facts' WHERE clause, and its parameters."""
    terms, params = [], []
    if query.start_date or query.end_date:  # a date missing from dim_date: in none
        days = "SELECT date_id FROM dim_date WHERE date_value BETWEEN ? AND ?"
        terms.append(f"date_id IN ({days})")
        params += [str(query.start_date or date.min), str(query.end_date or date.max)]
    for dim, ids in filters.items():  # a placeholder per id: SQLite seeks on each
        terms.append(f"{DIMENSIONS[dim][0]} IN ({', '.join('?' * len(ids))})")
        params += ids
    return (" WHERE " + " AND ".join(terms) if terms else ""), params


def groups_sql(fields: list[str], where: str) -> tuple[str, str]:
    """Each group's keys and sums, and whether to keep them or read them as needed."""
    keys = ", ".join(KEYS[field] for field in fields)
    if set(fields) == set(GRAIN):  # each fact row is a group: nothing to add up
        values = ", ".join(f"coalesce({m}, 0) AS {m}" for m in BASE_METRICS)
        # Read in the table's key order, a page stops at its last row.
        return f"SELECT {keys}, {values} FROM {FACT}{where}", "NOT MATERIALIZED"
    period = next((field for field in fields if field in WEEK_OR_MONTH), None)
    if period is None:
        sql = f"SELECT {keys}, {SUMS} FROM {FACT}{where} GROUP BY {keys}"
        return sql, "MATERIALIZED"
    # A week or a month adds up its days' sums: a few rows a day, not every fact.
    day_keys = ", ".join(KEYS[f] for f in ["date", *fields] if f != period)
    days = f"SELECT {day_keys}, {SUMS} FROM {FACT}{where} GROUP BY {day_keys}"
    outer = [f"{WEEK_OR_MONTH[f]} AS {f}" if f == period else KEYS[f] for f in fields]
    sql = f"SELECT {', '.join(outer)}, {SUMS} FROM ({days}) AS d GROUP BY {keys}"
    return sql, "MATERIALIZED"


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
            day = "(SELECT date_value FROM dim_date WHERE date_id = groups.date_id)"
            terms.append(f"{day}{way}, date_id{way}")
        else:
            terms.append(f"{KEYS[field]}{way}")
    return ", ".join(terms)


# The database -----------------------------------------------------------------------

STATEMENTS = 32  # at once: the operating system shares the cores among their threads
DOWNLOADS = 8  # CSV downloads at once, each with a connection of its own
CHUNK = 1000  # the rows a download reads at a time
# The fact table has our columns, or the error names the one it lacks.
FACT_COLUMNS = ["date_id", *(column for column, _, _ in DIMENSIONS.values())]
FACT_SQL = f"SELECT {', '.join(FACT_COLUMNS + BASE_METRICS)} FROM {FACT} LIMIT 0"
# Every (field, id, name) of the dimension tables, in id order; names as text.
CATALOG_SQL = " UNION ALL ".join(
    [
        f"SELECT '{d}', {c}, CAST({n} AS TEXT) FROM {t}"
        for d, (c, t, n) in DIMENSIONS.items()
    ]
    + ["SELECT 'date', date_id, date_value FROM dim_date ORDER BY 1, 2"]
)


@dataclass(frozen=True)
class Signature:
    """The data file's and its -wal's (device, inode, size, mtime_ns)."""

    file: tuple[int, int, int, int]
    wal: tuple[int, int, int, int] | None

    def settled(self) -> bool:
        """Whether a write from now on is sure to change the file's stamp."""
        newest = max(self.file[3], self.wal[3] if self.wal else 0)
        return time.time_ns() - newest > 100_000_000


@dataclass(frozen=True)
class Catalog:
    """What the service knows of a file besides its facts."""

    signature: Signature  # of the file it was read from
    ids: dict[str, dict[str, list[int]]]  # dimension -> folded name -> its ids
    dimensions: Dimensions  # the answer of GET /dimensions
    dates_in_id_order: bool  # then date_id sorts by date, in the table's key order


def read_catalog(signature: Signature, rows: list[tuple]) -> Catalog:
    """A null name is no name; a name stands for every id that has it, in any case."""
    ids, names = {dim: {} for dim in DIMENSIONS}, {dim: [] for dim in DIMENSIONS}
    dates = [value for field, _, value in rows if field == "date"]
    for value in dates:
        if not iso_date(value):
            raise ValueError(f"dim_date holds {value!r}, not a YYYY-MM-DD date")
    for dim, i, name in rows:
        if dim != "date" and name is not None:
            ids[dim].setdefault(name.casefold(), []).append(i)
            names[dim] += [] if name in names[dim] else [name]
    first_last = {"first": min(dates, default=None), "last": max(dates, default=None)}
    dimensions = Dimensions(date=first_last, **names)
    return Catalog(signature, ids, dimensions, dates_in_id_order=dates == sorted(dates))


def stamp(path: str) -> tuple[int, int, int, int] | None:
    """The (device, inode, size, mtime_ns) of the file at path; None if none is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def primary_code(error: sqlite3.Error) -> int:
    """SQLite's primary result code (SQLITE_BUSY_RECOVERY is SQLITE_BUSY), or 0."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF


def unreadable(path: str, reason: object) -> Unavailable:
    return Unavailable(f"database {path} cannot be read: {reason}")


class Database:
    """The data file, read by read-only connections lent one request at a time."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.uri = f"file:{quote(os.path.abspath(path))}?mode=ro"  # never creates it
        self.statements = asyncio.Semaphore(STATEMENTS)
        self.downloads = asyncio.Semaphore(DOWNLOADS)
        self.idle: list[tuple[tuple, aiosqlite.Connection]] = []  # (file_id, conn)
        self.known: Catalog | None = None

    def signature(self) -> Signature:
        """Stat the file and its -wal: two system calls, once a request."""
        file = stamp(self.path)
        if file is None:
            raise Unavailable(f"database {self.path} is missing")
        return Signature(file, stamp(self.path + "-wal"))

    @contextlib.asynccontextmanager
    async def time_limit(self) -> AsyncIterator[None]:
        """Bound a request's waiting and running; past the limit, a 503."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except TimeoutError:
            raise Unavailable(
                f"the query took longer than {self.timeout:g} s and was stopped; "
                "narrow the date range, add filters or group by fewer fields"
            ) from None

    async def catalog(self, file: Signature) -> Catalog:
        """The file's catalog: known, or read again (and kept once settled)."""
        if self.known and self.known.signature == file:
            return self.known
        await self.fetch(file, FACT_SQL)
        try:
            catalog = read_catalog(file, await self.fetch(file, CATALOG_SQL))
        except ValueError as e:
            raise unreadable(self.path, e) from None
        if file.settled():
            self.known = catalog
        return catalog

    async def fetch(self, file: Signature, sql: str, params: list = ()) -> list:
        """Run one statement on a lent connection; return its rows."""
        async with self.connection(file) as conn:
            return await self.patiently(lambda: conn.execute_fetchall(sql, params))

    async def export(self, file: Signature, sql: str, params: list):
        """Yield a statement's rows, CHUNK at a time. A download that stalls holds its
        connection: DOWNLOADS, fewer than STATEMENTS, bounds them."""
        if self.downloads.locked():
            raise Unavailable(f"{DOWNLOADS} downloads are under way; retry later")
        async with self.downloads, self.connection(file) as conn:
            cursor = await self.patiently(lambda: conn.execute(sql, params))
            rows = await cursor.fetchmany(CHUNK)
            yield rows
            while len(rows) == CHUNK:
                rows = await cursor.fetchmany(CHUNK)
                yield rows

    @contextlib.asynccontextmanager
    async def connection(self, file: Signature) -> AsyncIterator[aiosqlite.Connection]:
        """Lend a connection to this file. It comes back after a statement that ended
        well; any other is closed, so that no interrupt or doubt reaches another."""
        async with self.statements:
            opened_on, conn = self.idle.pop() if self.idle else (None, None)
            if opened_on != file.file[:2]:  # none idle, or one to another file
                if conn:
                    await conn.close()
                try:
                    conn = await aiosqlite.connect(self.uri, uri=True, timeout=0)
                except sqlite3.Error as e:
                    raise unreadable(self.path, e) from None
            try:
                yield conn
            except BaseException:  # time is up, the client left, or the file failed
                await conn.interrupt()
                await conn.close()
                raise
            self.idle.append((file.file[:2], conn))

    async def patiently(self, statement):
        """Await a statement, again every 50 ms while another process writes the file."""
        while True:
            try:
                return await statement()
            except sqlite3.Error as e:
                if not primary_code(e):  # not the file's error but ours: a 500
                    raise
                if primary_code(e) != sqlite3.SQLITE_BUSY:
                    raise unreadable(self.path, e) from None
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop()[1].close()


# The heartbeat ----------------------------------------------------------------------

JOB_RUNS_SQL = """CREATE TABLE IF NOT EXISTS job_runs
    (slot TEXT PRIMARY KEY, ran_at TEXT NOT NULL, pid INTEGER NOT NULL)"""
CLAIM_SQL = "INSERT INTO job_runs VALUES (?, ?, ?) ON CONFLICT (slot) DO NOTHING"
LAST_RUN_SQL = "SELECT slot, ran_at FROM job_runs ORDER BY slot DESC LIMIT 1"


class NotRecorded(Exception):
    """A heartbeat run that left no row; the message says why."""


class Heartbeat:
    """Logs each slot of a UTC grid once, in the worker that claims it first."""

    def __init__(self, path: str, interval: int) -> None:
        self.path, self.interval = path, interval
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.running = asyncio.Lock()  # held by a run in progress
        self.stopping = False

    def slot_at(self, timestamp: float) -> datetime:
        """The slot of timestamp: a multiple of the interval since the epoch."""
        return datetime.fromtimestamp(timestamp // self.interval * self.interval, UTC)

    def start(self) -> None:
        """Run on the grid, the latest slot at once: restarts neither shift nor replay."""
        self.scheduler.add_job(
            self.run,
            IntervalTrigger(seconds=self.interval, start_date=self.slot_at(0)),
            id="heartbeat",
            next_run_time=self.slot_at(time.time()),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=self.interval,  # late is fine, until the next slot
        )
        self.scheduler.start()

    async def run(self) -> None:
        """Claim the current slot; the process that wins logs the heartbeat."""
        now = time.time()
        slot = self.slot_at(now).isoformat()
        ran_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        # Give up half a second before the next slot is due, so that it is not skipped.
        deadline = self.slot_at(now).timestamp() + self.interval - 0.5
        async with self.running:
            try:
                if await self.claim([slot, ran_at, os.getpid()], deadline):
                    log.info("heartbeat slot=%s ran_at=%s", slot, ran_at)
            except NotRecorded as e:
                log.warning("heartbeat slot=%s not recorded: %s", slot, e)
            except Exception:
                log.exception("heartbeat slot=%s failed", slot)

    async def claim(self, row: list, deadline: float) -> bool:
        """Insert the slot's row unless it is there; True if this process did."""
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
            await asyncio.sleep(0.2)
        raise NotRecorded("the server is stopping")

    async def stop(self) -> None:
        """Stop scheduling; a run in progress ends its attempt and says so."""
        self.stopping = True
        self.scheduler.pause()
        await asyncio.sleep(0)  # a run handed over just now starts, and sees the stop
        async with self.running:  # no run is left for the shutdown to cancel
            self.scheduler.shutdown(wait=False)

    async def state(self) -> dict:
        """The schedule, and the latest run as the heartbeat's file has it now."""
        job, last_run = self.scheduler.get_job("heartbeat"), None
        with contextlib.suppress(sqlite3.Error):  # no file or no table yet: no run
            uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro"
            async with aiosqlite.connect(uri, uri=True, timeout=1) as db:
                for slot, ran_at in await db.execute_fetchall(LAST_RUN_SQL):
                    last_run = {"slot": slot, "ran_at": ran_at}
        return {
            "running": self.scheduler.running,
            "interval_seconds": self.interval,
            "next_run_at": job.next_run_time.isoformat() if job else None,
            "last_run": last_run,
            "overdue": self.overdue(last_run, time.time()),
        }

    def overdue(self, last_run: dict | None, now: float) -> bool:
        """Whether the latest slot has had no run for more than a minute."""
        latest = self.slot_at(now)
        ran = last_run is not None and last_run["slot"] >= latest.isoformat()
        return not ran and now - latest.timestamp() > 60


# Start-up ---------------------------------------------------------------------------


class StartupError(Exception):
    """Keeps the service from starting; the message says what to do."""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings, path = app.state.settings, app.state.settings.db_path
    # Start-up: check that the data file can be served, then start the heartbeat.
    if not log.handlers:
        log.addHandler(handler := logging.StreamHandler())
        line = "%(levelname)s:     %(name)s[%(process)d] %(message)s"
        handler.setFormatter(logging.Formatter(line))
    log.setLevel(settings.log_level)
    if sqlite3.sqlite_version_info < (3, 35):  # for MATERIALIZED and NULLS LAST
        raise StartupError(f"SQLite 3.35+ is needed, not {sqlite3.sqlite_version}")
    if not os.path.exists(path):
        create = f"create it with: python seed.py --db {path}"
        raise StartupError(f"database {path} not found; {create}")
    database = Database(path, settings.query_timeout)
    try:
        async with database.time_limit():  # waiting while another process writes
            await database.catalog(database.signature())
    except HTTPException as e:
        await database.close()
        raise StartupError(e.detail) from None
    heartbeat = Heartbeat(settings.heartbeat_db, settings.heartbeat_interval)
    heartbeat.start()
    app.state.database, app.state.heartbeat = database, heartbeat
    yield
    # Shutdown: let a heartbeat run end its attempt, then close the connections.
    await heartbeat.stop()
    await database.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service, with these settings or the environment's."""
    app = FastAPI(
        title="Ad Metrics API",
        lifespan=lifespan,
        exception_handlers={RequestValidationError: invalid, Exception: internal_error},
        responses=UNAVAILABLE,
    )
    app.state.settings = settings or Settings.from_env(os.environ)
    app.include_router(router)
    return app


app = create_app()

if __name__ == "__main__":
    settings = app.state.settings
    if not os.path.exists(settings.db_path):
        import seed

        print(f"{settings.db_path} not found: seeding it", file=sys.stderr)
        seed.main(["--db", settings.db_path])
    # On SIGTERM, a request has the query time limit to end: a stalled download too.
    grace = math.ceil(settings.query_timeout)
    level = settings.log_level.lower()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level,
        timeout_graceful_shutdown=grace,
    )
