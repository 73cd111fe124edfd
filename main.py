"""Ad Metrics API: daily advertising metrics from a SQLite star schema.

GET /metrics filters, groups, sorts and pages the metrics, with totals, as JSON or
CSV; GET /dimensions lists the values to filter by; GET /health reports on the
database and on the heartbeat, a job that records one run per 6-hour UTC slot across
all workers. Read top down: settings, models, routes, then the SQL, the database,
the heartbeat and start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import sqlite3
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Literal
from urllib.parse import quote, unquote_plus

import aiosqlite
import pydantic
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

log = logging.getLogger("ad_metrics")

# Settings ---------------------------------------------------------------------------


class Settings(BaseModel):
    """The configuration; `Settings.from_env(os.environ)` reads it once."""

    model_config = ConfigDict(frozen=True, validate_by_name=True)
    db_path: str = Field("ads.db", alias="ADS_DB")
    host: str = Field("127.0.0.1", alias="HOST")
    port: int = Field(8000, alias="PORT", ge=1, le=65535)
    heartbeat_interval: int = Field(21600, alias="HEARTBEAT_INTERVAL_SECONDS", ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", alias="LOG_LEVEL"
    )
    # The time a request may spend waiting for a connection and running its query.
    query_timeout: float = Field(10, alias="QUERY_TIMEOUT_SECONDS", gt=0, le=3600)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read the variables, or stop with one line that names a bad one."""
        names = {field.alias for field in cls.model_fields.values()}  # ADS_DB, …
        values = {name: value for name, value in env.items() if name in names}
        level = values.get("LOG_LEVEL", "INFO").upper()
        try:
            return cls.model_validate({**values, "LOG_LEVEL": level})
        except pydantic.ValidationError as e:
            bad = e.errors()[0]
            raise SystemExit(
                f"{bad['loc'][0]} {bad['input']!r}: {bad['msg']}"
            ) from None


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


def filter_field(dim: str):
    return Field(
        default_factory=list,
        description=f"Keep only these {dim} values (see /dimensions), any case: repeat "
        "the parameter or separate values with commas; a known name is taken whole.",
    )


class MetricsQuery(BaseModel):
    """The query parameters of GET /metrics."""

    model_config = ConfigDict(extra="forbid")
    start_date: date | None = Field(None, description="First day, YYYY-MM-DD.")
    end_date: date | None = Field(None, description="Last day, YYYY-MM-DD.")
    region: list[str] = filter_field("region")
    age_group: list[str] = filter_field("age_group")
    gender: list[str] = filter_field("gender")
    platform: list[str] = filter_field("platform")
    placement: list[str] = filter_field("placement")
    device_type: list[str] = filter_field("device_type")
    group_by: list[Literal[*GROUP_FIELDS]] = Field(
        default_factory=lambda: list(GRAIN),
        description="The breakdown, in output order; at most one of date, week and "
        "month. Default: the seven fact dimensions, one row per fact row.",
    )
    sort: list[str] = Field(
        default_factory=list,
        description="Grouped fields or metrics to sort by, '-' for descending; the "
        f"group_by fields then break ties. Metrics: {', '.join(METRICS)}.",
    )
    limit: int = Field(100, ge=1, le=1000, description="Rows per page; CSV: all rows.")
    offset: int = Field(0, ge=0, le=2**63 - 1, description="Rows to skip.")
    format: Literal["json", "csv"] = Field("json", description="csv: the rows, a file.")

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def iso_date(cls, value: object, info: ValidationInfo) -> object:
        """Accept YYYY-MM-DD only, and only real dates."""
        if not isinstance(value, str):
            return value
        problem = "is not a date in YYYY-MM-DD form"
        if len(value) == 10 and value[4] == value[7] == "-":
            with contextlib.suppress(ValueError):
                return date.fromisoformat(value)
            problem = "is not a real date"
        message = f"{info.field_name} {shorten(value)} {problem}"
        raise PydanticCustomError("date_parsing", message)

    @field_validator("end_date")
    @classmethod
    def end_after_start(cls, end: date | None, info: ValidationInfo) -> date | None:
        if (start := info.data.get("start_date")) and end and end < start:
            message = f"end_date {end} is before start_date {start}"
            raise PydanticCustomError("value_error", message)
        return end

    @field_validator("group_by", mode="before")
    @classmethod
    def check_group_by(cls, values: list[str]) -> list[str]:
        """Known fields, each once, and at most one of date, week and month."""
        fields = [item.strip() for value in values for item in value.split(",")]
        if error := first_error("group_by", fields, GROUP_FIELDS, key=str):
            raise error
        if len(periods := [field for field in fields if field in PERIODS]) > 1:
            message = f"group_by takes one of date, week and month, not {periods}"
            raise PydanticCustomError("value_error", message)
        return fields

    @field_validator("sort")
    @classmethod
    def check_sort(cls, values: list[str], info: ValidationInfo) -> list[str]:
        """Output fields, each once, '-' for descending."""
        items = [item.strip() for value in values for item in value.split(",")]
        valid = [*info.data.get("group_by", GROUP_FIELDS), *METRICS]
        if error := first_error("sort", items, valid, lambda s: s.removeprefix("-")):
            raise error
        return items


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    """A group: its group_by fields first, in group_by order (a name is null when its
    id is missing from its table), then the metrics."""

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


# The routes -------------------------------------------------------------------------


async def get_database(request: Request) -> Database:  # async: no thread hop
    return request.app.state.database


async def get_heartbeat(request: Request) -> Heartbeat:
    return request.app.state.heartbeat


DatabaseDep = Annotated["Database", Depends(get_database)]
HeartbeatDep = Annotated["Heartbeat", Depends(get_heartbeat)]
NOT_MODIFIED = {304: {"description": "If-None-Match holds the current ETag."}}
UNAVAILABLE = {503: {"description": "The database cannot answer; detail says why."}}
CSV_ANSWER = {200: {"content": {"text/csv": {}}, "description": "JSON, or CSV rows."}}


async def get_metrics(
    request: Request, query: Annotated[MetricsQuery, Query()], database: DatabaseDep
) -> Response:
    """Return metrics grouped by `group_by`, filtered, sorted and paged, with totals.
    Example: `/metrics?start_date=2025-03-01&platform=Instagram&sort=-cost`"""
    snapshot = database.snapshot()
    filters = resolve_filters(query, snapshot)
    headers = cache_headers(request, snapshot.version)  # or a 304, with no query run
    groups, rows, page, params = metrics_sql(query, filters, snapshot)
    heavy = share_read(query, filters, snapshot) > HEAVY_SHARE
    if query.format == "csv":
        limit = query.limit if "limit" in query.model_fields_set else -1  # -1: all
        sql, params = f"WITH {groups} {rows}", [*params, limit, query.offset]
        chunks = database.export(snapshot, sql, params, heavy)
        first = await anext(chunks)  # the first rows, within the time limit
        headers["Content-Disposition"] = 'attachment; filename="metrics.csv"'
        body = csv_text([*query.group_by, *METRICS], first, chunks)
        return StreamingResponse(body, media_type="text/csv", headers=headers)
    params += [query.limit, query.offset]
    [(data, totals, total_rows)] = await database.fetch(snapshot, page, params, heavy)
    paging = {"limit": query.limit, "offset": query.offset, "total_rows": total_rows}
    paging["next"] = next_page(request, query, total_rows)
    paging = json.dumps(paging, separators=(",", ":"))  # as compact as SQLite's
    body = f'{{"data":{data},"totals":{totals},"paging":{paging}}}'
    return Response(body, media_type="application/json", headers=headers)


async def get_dimensions(request: Request, database: DatabaseDep) -> Response:
    """List each dimension's values, in their table's order, and the range of dates."""
    snapshot = database.snapshot()
    headers = cache_headers(request, snapshot.version)
    return Response(snapshot.listing, media_type="application/json", headers=headers)


async def health(database: DatabaseDep, heartbeat: HeartbeatDep) -> JSONResponse:
    """Report whether the database can be read, and the heartbeat's schedule and run."""
    try:
        last_run = database.snapshot().last_run
    except Unavailable as e:
        body = {"status": "unavailable", "reason": e.detail}
        return JSONResponse(body | {"scheduler": heartbeat.state(None)}, 503)
    return JSONResponse({"status": "ok", "scheduler": heartbeat.state(last_run)})


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's standard 422 body, each message naming its parameter and value."""
    detail = jsonable_encoder(error.errors())
    for e in detail:
        if not e["msg"].startswith(name := str(e["loc"][-1])):  # pydantic's own
            e["msg"] = f"{name} {shorten(str(e.get('input')))}: {e['msg']}"
    return JSONResponse({"detail": detail}, status_code=422)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    # The server logs the traceback; the client learns only that the fault is ours.
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


class Unavailable(HTTPException):
    """The database cannot answer now: a 503 whose detail says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


def cache_headers(request: Request, version: str) -> dict[str, str]:
    """Tag the answer by the data's version and the request; or raise a 304 at once
    if the client's If-None-Match holds that tag (a weak match, as RFC 9110 says)."""
    key = f"{version} {request.scope['path']}?".encode() + request.scope["query_string"]
    tag = f'"{hashlib.blake2b(key, digest_size=12).hexdigest()}"'
    headers = {"ETag": tag, "Cache-Control": "no-cache"}  # always revalidate
    given = request.headers.get("if-none-match", "").split(",")
    if any(t.strip().removeprefix("W/") in (tag, "*") for t in given):
        raise HTTPException(304, headers=headers)
    return headers


def next_page(request: Request, query: MetricsQuery, total_rows: int) -> str | None:
    """The next page's URL: the client's own query string with a new offset."""
    if (offset := query.offset + query.limit) >= total_rows:
        return None
    given = request.scope["query_string"].decode("latin-1").split("&")
    kept = [p for p in given if unquote_plus(p.split("=")[0]) not in ("", "offset")]
    return f"{request.scope['path']}?{'&'.join([*kept, f'offset={offset}'])}"


async def csv_text(
    header: list, first_rows: list, rest: AsyncIterator
) -> AsyncIterator:
    """Write the header and the rows as CSV (RFC 4180; None as ""), chunk by chunk."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    rows = first_rows
    try:
        while rows is not None:
            writer.writerows(rows)
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            rows = await anext(rest, None)
    finally:  # also when the client left (a response cut short: when collected)
        await rest.aclose()


# Filter values and their errors -------------------------------------------------------


def shorten(value: str) -> str:
    """Quote a client's value for a message, cut to a readable length."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


def first_error(name: str, items: list[str], valid: list[str], key=str.casefold):
    """The first item that is empty, not one of `valid` or repeated, as an error;
    items are compared by key (a name's, folded; a sort field's, without its '-')."""
    known, keys = {key(v) for v in valid}, [key(item) for item in items]
    for i, item in enumerate(items):
        if not item:
            return PydanticCustomError("string_too_short", f"{name} has an empty value")
        if keys[i] not in known:
            message = f"{name} {shorten(item)} is not one of: {', '.join(valid)}"
            return PydanticCustomError("literal_error", message)
        if keys[i] in keys[:i]:
            message = f"{name} lists {shorten(item)} more than once"
            return PydanticCustomError("value_error", message)
    return None


def resolve_filters(query: MetricsQuery, snapshot: Snapshot) -> dict[str, list[int]]:
    """Map each filter's names to ids, or answer 422 naming each filter's first bad
    value. Values are split on commas, but a known name is taken whole."""
    filters, errors = {}, []
    for dim in DIMENSIONS:
        if not (values := getattr(query, dim)):
            continue
        ids, names = snapshot.ids[dim], []
        for value in values:
            names += [value] if value.strip().casefold() in ids else value.split(",")
        names = [name.strip() for name in names]
        if error := first_error(dim, names, snapshot.names[dim]):
            loc, msg = ("query", dim), error.message()
            errors.append({"type": error.type, "loc": loc, "msg": msg, "input": values})
        else:
            filters[dim] = [i for name in names for i in ids[name.casefold()]]
    if errors:
        raise RequestValidationError(errors)
    return filters


# How a query becomes SQL ------------------------------------------------------------
# Identifiers come only from the names above; every value is a parameter.


def ratio(n: str, d: str) -> str:
    """SQL for n / d to 6 decimals, exactly, from integers, a half away from zero (a
    refund's cost is negative): SQLite's integer division truncates toward zero, so
    the millionths are (2,000,000 n ± d) div 2d, |d| added to |2,000,000 n|; null
    when d is 0."""
    half = f"iif(({n} < 0) = ({d} < 0), {d}, -{d})"
    return f"(2000000 * {n} + {half}) / NULLIF(2 * {d}, 0) / 1e6"


# Counts as integers (a user's file may hold 5.0), and the cost in whole cents; a
# null, as in the totals, is 0.
N = {m: f"CAST(coalesce({m}, 0) AS INTEGER)" for m in BASE_METRICS if m != "cost"}
CENTS = "CAST(round(100 * coalesce(cost_sum, 0)) AS INTEGER)"
OUTPUT = {  # each output metric, from a group's sums
    "impressions": N["impressions"],
    "clicks": N["clicks"],
    "cost": f"{CENTS} / 100.0",
    "conversions": N["conversions"],
    "likes": N["likes"],
    "ctr": ratio(N["clicks"], N["impressions"]),
    "cpc": ratio(CENTS, f"100 * {N['clicks']}"),
    "cpm": ratio(f"10 * {CENTS}", N["impressions"]),
    "cpa": ratio(CENTS, f"100 * {N['conversions']}"),
    "conversion_rate": ratio(N["conversions"], N["clicks"]),
}
OUTPUT_SQL = ", ".join(f"{sql} AS {name}" for name, sql in OUTPUT.items())
SUMS = {m: "cost_sum" if m == "cost" else m for m in BASE_METRICS}  # names in groups
COLUMNS = {  # each group_by field's column in groups
    "date": "date_id",
    "week": "week",
    "month": "month",
    **{dim: column for dim, (column, _, _) in DIMENSIONS.items()},
}
NAMES = {"date": ("date_id", "dim_date", "date_value"), **DIMENSIONS}  # labelled
DAY = "(SELECT date_value FROM dim_date WHERE date_id = day.date_id)"
LABELS = {  # a period's label from its day, as a plain date
    "week": f"date({DAY}, 'weekday 0', '-6 days')",  # the week's Monday
    "month": f"substr({DAY}, 1, 7)",
}
# A query that reads more than this share of the fact rows waits for one of the
# heavy turns, one per core: light queries then always find a connection (their p99
# in the bench's soak, 32 clients: 5.1 s without the turns, 182 ms with them).
HEAVY_SHARE = 0.1


def share_read(query: MetricsQuery, filters: dict, snapshot: Snapshot) -> float:
    """The share of the fact rows a query reads, were they spread evenly."""
    first = bisect_left(snapshot.dates, str(query.start_date or date.min))
    last = bisect_right(snapshot.dates, str(query.end_date or date.max))
    share = (last - first) / max(1, len(snapshot.dates))
    for dim, ids in filters.items():
        share *= len(ids) / max(1, len(snapshot.names[dim]))
    return share


def metrics_sql(query: MetricsQuery, filters: dict, snapshot: Snapshot) -> tuple:
    """Return the SQL of a query's groups (a CTE), of its rows in order, and of its
    JSON answer, with the parameters that come before LIMIT and OFFSET."""
    where, params = [], []
    if query.start_date or query.end_date:  # a date not in dim_date is in no range
        days = "SELECT date_id FROM dim_date WHERE date_value BETWEEN ? AND ?"
        where.append(f"f.date_id IN ({days})")
        params += [str(query.start_date or date.min), str(query.end_date or date.max)]
    for dim, ids in filters.items():  # a placeholder per value: SQLite seeks on each
        where.append(f"f.{DIMENSIONS[dim][0]} IN ({', '.join('?' * len(ids))})")
        params += ids
    where_sql = f" WHERE {' AND '.join(where)}" if where else ""
    fields = tuple(query.group_by)
    shape = (tuple(query.sort), where_sql, snapshot.dates_in_id_order)
    return *statements(fields, *shape, snapshot.ids_unique), params


@functools.lru_cache(maxsize=1024)  # a shape's SQL, built once: it took 80 µs
def statements(fields, sort, where, dates_in_id_order: bool, ids_unique: bool):
    """The SQL for a query of this shape. For `group_by=month,region&sort=-cost`
    `&region=Africa&start_date=2025-01-01&end_date=2025-03-31`:

    groups  the matching facts added up per group, once (MATERIALIZED); weeks and
            months from the days' sums, a few rows a day:
        groups(month, region_id, impressions, clicks, cost_sum, …) AS MATERIALIZED (
          SELECT substr(<the day's date_value>, 1, 7), day.region_id, sum(…), …
          FROM (SELECT f.date_id, f.region_id, sum(f.impressions) AS impressions, …
                FROM fact_ad_metrics_daily AS f
                WHERE f.date_id IN (SELECT date_id FROM dim_date
                                    WHERE date_value BETWEEN ? AND ?)
                  AND f.region_id IN (?)
                GROUP BY 1, 2) AS day
          GROUP BY 1, 2)
    rows    a page of groups in order, then their names (null for a missing id):
        SELECT p.month AS month, dim_region.region_name AS region, …
        FROM (SELECT g.month, g.region_id, <the ten metrics> FROM groups AS g
              ORDER BY cost DESC, g.month, g.region_id LIMIT ? OFFSET ?) AS p
        LEFT JOIN dim_region ON dim_region.region_id = p.region_id
    page    one statement: the page and the totals as JSON, and the group count.
    """
    groups = groups_sql(fields, where)
    columns = ", ".join(f"g.{COLUMNS[field]}" for field in fields)
    order = order_by(fields, sort, dates_in_id_order)
    page = f"SELECT {columns}, {OUTPUT_SQL} FROM groups AS g ORDER BY {order}"
    page += " LIMIT ? OFFSET ?"
    labels = [label(field, ids_unique) for field in fields]
    values = ", ".join([*labels, *(f"p.{m} AS {m}" for m in METRICS)])
    rows = f"SELECT {values} FROM ({page}) AS p"
    if ids_unique:
        rows += joins(fields)
    return groups, rows, answer_sql(groups, rows, fields)


def answer_sql(groups: str, rows: str, fields: tuple) -> str:
    """One statement: the page and the totals, as JSON, and the number of groups."""
    row = ", ".join(f"'{name}', {name}" for name in [*fields, *METRICS])
    totals = ", ".join(f"'{name}', {name}" for name in METRICS)
    sums = ", ".join(f"coalesce(sum({s}), 0) AS {s}" for s in SUMS.values())
    return (
        f"WITH {groups}, page AS ({rows}), totals AS (SELECT group_count, {OUTPUT_SQL} "
        f"FROM (SELECT count(*) AS group_count, {sums} FROM groups)) "
        f"SELECT (SELECT json_group_array(json_object({row})) FROM page), "
        f"json_object({totals}), group_count FROM totals"
    )


def groups_sql(fields: tuple, where: str) -> str:
    """The CTE `groups`: a row per group, its keys and its sums."""
    names = ", ".join([*(COLUMNS[field] for field in fields), *SUMS.values()])
    by = ", ".join(map(str, range(1, len(fields) + 1)))
    if set(fields) == set(GRAIN):  # each fact row is a group: nothing to add up
        keys = ", ".join(f"f.{COLUMNS[field]}" for field in fields)
        metrics = ", ".join(f"f.{m}" for m in BASE_METRICS)
        select = f"SELECT {keys}, {metrics} FROM {FACT} AS f{where}"
        # Not materialized: read in key order, the page stops at its last row.
        return f"groups({names}) AS NOT MATERIALIZED ({select})"
    period = next((field for field in fields if field in LABELS), None)
    day_fields = ["date", *fields] if period else fields
    keys = ", ".join(f"f.{COLUMNS[f]}" for f in day_fields if f != period)
    sums = ", ".join(f"sum(f.{m}) AS {s}" for m, s in SUMS.items())
    select = f"SELECT {keys}, {sums} FROM {FACT} AS f{where} GROUP BY {by}"
    if period:  # then add up the days of each week or month
        keys = ", ".join(
            LABELS[f] if f == period else f"day.{COLUMNS[f]}" for f in fields
        )
        sums = ", ".join(f"sum(day.{s})" for s in SUMS.values())
        select = f"SELECT {keys}, {sums} FROM ({select}) AS day GROUP BY {by}"
    return f"groups({names}) AS MATERIALIZED ({select})"


def order_by(fields: tuple, sort: tuple, dates_in_id_order: bool) -> str:
    """The rows' order: the requested sort, then the group_by fields to break ties.
    Dimensions sort by id, periods in time, metrics by value with null last."""
    sorted_fields = {item.removeprefix("-") for item in sort}
    terms = []
    for item in [*sort, *(field for field in fields if field not in sorted_fields)]:
        field, way = item.removeprefix("-"), " DESC" if item.startswith("-") else ""
        if field in RATIOS:  # the output column
            terms.append(f"{field}{way} NULLS LAST")
        elif field in METRICS:
            terms.append(f"{field}{way}")
        elif field == "date" and not dates_in_id_order:
            day = "(SELECT date_value FROM dim_date WHERE date_id = g.date_id)"
            terms.append(f"{day}{way}, g.date_id{way}")
        else:
            terms.append(f"g.{COLUMNS[field]}{way}")
    return ", ".join(terms)


def label(field: str, joined: bool) -> str:
    """A group_by field's output value, from the page's row p: a name from its table,
    joined if each id is there once (Q6's statement: 368 µs with a lookup per name,
    290 µs joined), else looked up (a table loaded twice must not double the rows)."""
    if field in LABELS:
        return f"p.{field} AS {field}"
    column, table, name = NAMES[field]
    text = f"CAST({table}.{name} AS TEXT)"  # as /dimensions lists it
    if joined:
        return f"{text} AS {field}"
    return f"(SELECT {text} FROM {table} WHERE {column} = p.{column}) AS {field}"


def joins(fields: tuple) -> str:
    """The LEFT JOINs that bring the page's names (null for a missing id)."""
    named = [NAMES[field] for field in fields if field in NAMES]
    return "".join(f" LEFT JOIN {t} ON {t}.{c} = p.{c}" for c, t, _ in named)


# The database -----------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the file holds besides its facts, read again whenever its data changes."""

    pool: Pool  # connections to the file it was read from
    data_version: int  # the pool's PRAGMA data_version when it was read
    version: str  # new in every process, whenever the file or its data changes
    names: dict[str, list[str]]  # dimension -> names, in id order
    ids: dict[str, dict[str, list[int]]]  # dimension -> casefolded name -> ids
    dates: list[str]  # in date order
    dates_in_id_order: bool  # then dates sort by id: Q1 took 20 ms, not 61 ms
    ids_unique: bool  # each id column, dim_date's too, is a key: names are joined
    last_run: dict | None  # the heartbeat's latest run
    listing: bytes  # the body of GET /dimensions


async def read_snapshot(pool: Pool, data_version: int) -> Snapshot:
    """Read the dimension tables and the latest heartbeat; check the fact's columns."""
    db = pool.watcher
    columns = ", ".join(f"f.{c}" for c in [*(COLUMNS[f] for f in GRAIN), *BASE_METRICS])
    await db.execute_fetchall(f"SELECT {columns} FROM {FACT} AS f LIMIT 0")
    tables, keyed = {}, True  # field -> (id, name) rows, in id order
    for field, (column, table, name) in NAMES.items():
        text = name if field == "date" else f"CAST({name} AS TEXT)"  # as in rows
        sql = f"SELECT {column}, {text} FROM {table} ORDER BY 1"
        tables[field] = await db.execute_fetchall(sql)
        if not await is_key(db, table, column):
            keyed = False
    dates = [value for _, value in tables.pop("date")]
    check_dates(dates)
    names, ids = {}, {}
    for dim, rows in tables.items():
        names[dim], ids[dim] = index_names(rows)
    last_run = None
    with contextlib.suppress(sqlite3.Error):  # no job_runs yet, or not ours: no run
        sql = "SELECT slot, ran_at FROM job_runs ORDER BY slot DESC LIMIT 1"
        for slot, ran_at in await db.execute_fetchall(sql):
            last_run = {"slot": slot, "ran_at": ran_at}
    ordered = sorted(dates)
    first, last = (ordered[0], ordered[-1]) if ordered else (None, None)
    listing = {"date": {"first": first, "last": last}} | names
    return Snapshot(
        pool=pool,
        data_version=data_version,
        version=f"{os.getpid()}.{time.time_ns()}",
        names=names,
        ids=ids,
        dates=ordered,
        dates_in_id_order=dates == ordered,
        ids_unique=keyed,
        last_run=last_run,
        listing=json.dumps(listing, separators=(",", ":")).encode(),
    )


def check_dates(dates: list) -> None:
    """Stop at a dim_date value that is not a real date written YYYY-MM-DD."""
    for value in dates:
        with contextlib.suppress(TypeError, ValueError):
            if date.fromisoformat(value).isoformat() == value:
                continue
        raise ValueError(f"dim_date holds {value!r}, not a YYYY-MM-DD date")


def index_names(rows: list) -> tuple[list[str], dict[str, list[int]]]:
    """A table's names in id order, and the ids of each name, casefolded: a filter
    value stands for every id of its name. A null name is no name."""
    rows = [(i, n) for i, n in dict.fromkeys(rows) if n is not None]
    ids = {}
    for i, n in rows:
        ids.setdefault(n.casefold(), []).append(i)
    return list(dict.fromkeys(n for _, n in rows)), ids


async def is_key(db: aiosqlite.Connection, table: str, column: str) -> bool:
    """Whether the schema holds each value of column in one row at most, so that a
    join on it doubles no row: the primary key or a unique index, with INTEGER
    affinity (under which 1 and '1' are one value)."""
    sql = "SELECT lower(name), upper(type), pk FROM pragma_table_info(?)"
    columns = await db.execute_fetchall(sql, [table])
    if not any(name == column and "INT" in kind for name, kind, _ in columns):
        return False
    if [name for name, _, pk in columns if pk] == [column]:
        return True
    sql = (
        'SELECT 1 FROM pragma_index_list(?) AS i WHERE i."unique" AND NOT i.partial '
        "AND (SELECT group_concat(lower(name)) FROM pragma_index_info(i.name)) = ?"
    )
    return bool(await db.execute_fetchall(sql, [table, column]))


CHUNK = 1000  # the rows an export reads at a time
# CSV downloads at once (then 503s): 60 stalled downloads held 60 threads and 145 files.
DOWNLOADS = 8


def unreadable(path: str, reason: object) -> Unavailable:
    return Unavailable(f"database {path} cannot be read: {reason}")


def file_uri(path: str, mode: str) -> str:
    """The URI that opens path with mode "ro" or "rw": never creating the file."""
    return f"file:{quote(os.path.abspath(path))}?mode={mode}"


def identify(path: str) -> tuple[int, int]:
    """The device and inode of the file at path: a replaced file has others."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Unavailable(f"database {path} is missing") from None
    except OSError as e:
        raise unreadable(path, e.strerror) from None
    return st.st_dev, st.st_ino


def primary_code(error: sqlite3.Error) -> int:
    """SQLite's primary result code: SQLITE_BUSY_RECOVERY, say, is SQLITE_BUSY."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF


async def stop_statement(conn: aiosqlite.Connection) -> None:
    """Interrupt conn's statement until its thread is idle: a no-op queued behind the
    statement has run (interrupting again, if the statement had not started)."""
    idle = asyncio.ensure_future(conn.execute_fetchall("SELECT 1"))
    while not idle.done():
        await conn.interrupt()
        await asyncio.wait([idle], timeout=0.01)
    idle.exception()  # marks its error (interrupted too, perhaps) as seen


class Pool:
    """Read-only connections, each with its own thread, to one file (one inode), so
    that they go on reading it even after another file replaces it at the path."""

    def __init__(self, path: str, file_id: tuple[int, int]) -> None:
        self.path, self.file_id = path, file_id
        self.watcher: aiosqlite.Connection | None = None  # the Database's own
        self.idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self.users, self.retired = 0, False  # requests holding or awaiting one

    async def connect(self) -> aiosqlite.Connection | None:
        """A new connection to this pool's file; None if the path names another."""
        uri = file_uri(self.path, "ro")
        try:
            conn = await aiosqlite.connect(uri, uri=True, timeout=0)
        except sqlite3.Error as e:  # removed just now, say
            raise unreadable(self.path, e) from None
        try:
            if identify(self.path) == self.file_id:
                return conn
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        return None

    async def fill(self, size: int) -> bool:
        """Open the watcher's connection and size others; False if the file changed."""
        for _ in range(size + 1):
            if not (conn := await self.connect()):
                return False
            if self.watcher is None:
                self.watcher = conn
            else:
                self.idle.put_nowait(conn)
        return True

    async def retire(self) -> None:
        """Close the connections, at once or as soon as no request uses the pool."""
        self.retired, watcher, self.watcher = True, self.watcher, None
        if watcher:  # once: aiosqlite must not close a connection twice at once
            await watcher.close()
        while self.users == 0 and not self.idle.empty():
            await self.idle.get_nowait().close()


class Database:
    """The file at `path`, watched twice a second: another file there (another inode)
    gets a new pool, new data (PRAGMA data_version) a new snapshot, a missing or
    unreadable file the reason for 503s. A request uses one snapshot and its pool."""

    def __init__(self, path: str, timeout: float, size: int = 8) -> None:
        self.path, self.timeout, self.size = path, timeout, size
        self.turns = asyncio.Semaphore(os.cpu_count() or 2)  # for heavy queries
        self.downloads = asyncio.Semaphore(DOWNLOADS)
        self.current: Snapshot | None = None
        self.problem = f"database {path} has not been read yet"
        self.watching: asyncio.Task | None = None

    def snapshot(self) -> Snapshot:
        if self.current is None:
            raise Unavailable(self.problem)
        return self.current

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.check()
            except Exception:  # a bug of ours: say so, and look again
                log.exception("checking database %s failed", self.path)

    async def check(self) -> None:
        """Look at the file once: note another file, new data, or what is wrong."""
        old, pool = self.current, None
        try:
            file_id = identify(self.path)
            if old and old.pool.file_id == file_id:
                pool = old.pool
            elif not await (pool := Pool(self.path, file_id)).fill(self.size):
                return  # replaced while connecting: look again next time
            [[version]] = await pool.watcher.execute_fetchall("PRAGMA data_version")
            if not old or pool is not old.pool or version != old.data_version:
                self.current = await read_snapshot(pool, version)
        except Unavailable as e:
            self.current, self.problem = None, e.detail
        except (sqlite3.Error, ValueError) as e:
            if isinstance(e, ValueError) or primary_code(e) != sqlite3.SQLITE_BUSY:
                self.current = None  # (while a writer commits, look again later)
                self.problem = unreadable(self.path, e).detail
        finally:  # a pool that no snapshot has closes once its last requests end
            current_pool = self.current.pool if self.current else None
            for unused in (old.pool if old else None, pool):
                if unused is not None and unused is not current_pool:
                    await unused.retire()

    def busy(self) -> Unavailable:
        return Unavailable(
            f"every connection stayed busy for {self.timeout:g} s; retry later"
        )

    @contextlib.asynccontextmanager
    async def turn(self, deadline: float):
        """Hold one of the heavy queries' turns, waited for until the deadline."""
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await self.turns.acquire()
        except TimeoutError:
            raise self.busy() from None
        try:
            yield
        finally:
            self.turns.release()

    @contextlib.asynccontextmanager
    async def connection(self, snapshot: Snapshot, deadline: float, heavy: bool):
        """Lend one of the snapshot's connections (after a turn, if the query is
        heavy), waiting for it until the deadline."""
        pool = snapshot.pool
        pool.users += 1  # before any await: a retired pool keeps its connections
        try:
            async with self.turn(deadline) if heavy else contextlib.nullcontext():
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        conn = await pool.idle.get()
                except TimeoutError:
                    raise self.busy() from None
                try:
                    yield conn
                finally:
                    pool.idle.put_nowait(conn)
        finally:
            pool.users -= 1
            if pool.retired:
                await pool.retire()

    async def fetch(self, snapshot: Snapshot, sql: str, params: list, heavy=False):
        """Run a statement: the wait for a connection and the run share one limit."""
        deadline = time.monotonic() + self.timeout
        async with self.connection(snapshot, deadline, heavy) as conn:
            work = functools.partial(conn.execute_fetchall, sql, params)
            return await self.run(conn, work, deadline)

    async def export(self, snapshot: Snapshot, sql: str, params: list, heavy=False):
        """Yield a statement's rows, CHUNK at a time, from a connection of its own, so
        that a slow download keeps no pooled connection; it holds a thread and a read
        of the file, so DOWNLOADS bounds them. A heavy export holds a turn for its first
        rows only, which the time limit bounds."""
        deadline = time.monotonic() + self.timeout
        if self.downloads.locked():
            raise Unavailable(f"{DOWNLOADS} downloads are under way; retry later")
        async with self.downloads:
            if not (conn := await snapshot.pool.connect()):
                raise Unavailable(f"database {self.path} was replaced just now; retry")
            try:
                async with self.turn(deadline) if heavy else contextlib.nullcontext():
                    execute = functools.partial(conn.execute, sql, params)
                    cursor = await self.run(conn, execute, deadline)
                    first = functools.partial(cursor.fetchmany, CHUNK)
                    chunk = await self.run(conn, first, deadline)
                yield chunk  # the first, perhaps empty
                while len(chunk) == CHUNK:
                    chunk = await cursor.fetchmany(CHUNK)
                    yield chunk
            finally:
                await conn.interrupt()  # the client left: stop the statement
                await conn.close()

    async def run(self, conn: aiosqlite.Connection, work: Callable, deadline: float):
        """Await work on conn by the deadline, and again while another process has a
        lock. Past the deadline, or if the request is cancelled, stop the statement
        while this request still holds conn: no other request's is interrupted."""
        while True:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    return await work()
            except TimeoutError:
                await stop_statement(conn)
                raise Unavailable(
                    f"the query took longer than {self.timeout:g} s and was "
                    "stopped; narrow the date range, add filters or group by "
                    "fewer fields"
                ) from None
            except asyncio.CancelledError:
                await stop_statement(conn)
                raise
            except sqlite3.Error as e:
                if primary_code(e) != sqlite3.SQLITE_BUSY:
                    raise unreadable(self.path, e) from None
            await asyncio.sleep(0.05)  # busy: a writer commits; try again

    async def close(self) -> None:
        """Stop watching; close each connection once its request is done with it."""
        try:
            if self.watching:
                self.watching.cancel()
                await asyncio.wait([self.watching])
        finally:  # even if close() itself is cancelled: open connections keep a thread
            if self.current:
                await self.current.pool.retire()


# The heartbeat ----------------------------------------------------------------------


JOB_RUNS_TABLE = """CREATE TABLE IF NOT EXISTS job_runs
    (slot TEXT PRIMARY KEY, ran_at TEXT NOT NULL, pid INTEGER NOT NULL)"""
CLAIM = "INSERT INTO job_runs VALUES (?, ?, ?) ON CONFLICT (slot) DO NOTHING"


async def empty_wal(db: aiosqlite.Connection, slot: str) -> None:
    """Copy the WAL into the file and truncate it, unless a reader holds it: the
    service's read-only connections never checkpoint, and a file put at the path later
    would be read with the frames left there. Best effort: the row is in either way."""
    try:
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as e:
        log.warning("the WAL was not emptied after slot %s: %s", slot, e)


class NotRecorded(Exception):
    """A heartbeat run that wrote no row; the message says why."""


class Heartbeat:
    """Runs once per slot of a UTC grid, in one of the processes that share the file."""

    def __init__(self, path: str, interval: int) -> None:
        self.path, self.interval, self.stopping = path, interval, False
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.run_lock = asyncio.Lock()  # held by a run in progress

    def slot_at(self, timestamp: float) -> datetime:
        """The slot of timestamp: a multiple of the interval since the epoch."""
        return datetime.fromtimestamp(timestamp // self.interval * self.interval, UTC)

    def start(self) -> None:
        """Schedule the runs, the latest slot's at once (if it ran, its claim finds
        the row); late is fine, until the next slot is due."""
        trigger = IntervalTrigger(seconds=self.interval, start_date=self.slot_at(0))
        once = {
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": self.interval,
        }
        latest = self.slot_at(time.time())
        self.scheduler.add_job(
            self.run, trigger, id="heartbeat", next_run_time=latest, **once
        )
        self.scheduler.start()

    async def run(self) -> None:
        """Claim the current slot; the process whose claim wins logs the heartbeat."""
        now = time.time()
        slot = self.slot_at(now).isoformat()
        ran_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        # Give up half a second before the next slot is due, so that it is not skipped.
        deadline = self.slot_at(now).timestamp() + self.interval - 0.5
        async with self.run_lock:
            try:
                if await self.claim(slot, ran_at, deadline):
                    log.info("heartbeat slot=%s ran_at=%s", slot, ran_at)
            except NotRecorded as e:
                log.warning("heartbeat slot=%s not recorded: %s", slot, e)
            except Exception:
                log.exception("heartbeat slot=%s failed", slot)

    async def claim(self, slot: str, ran_at: str, deadline: float) -> bool:
        """Insert the slot's row unless it is there, then empty the WAL; True if this
        process did. While the file is locked or missing, try again every 0.2 s, in the
        event loop (never in a thread), until the deadline or a stop."""
        uri = file_uri(self.path, "rw")
        while not self.stopping:
            try:
                async with aiosqlite.connect(uri, uri=True, timeout=0.05) as db:
                    await db.execute(JOB_RUNS_TABLE)
                    cursor = await db.execute(CLAIM, (slot, ran_at, os.getpid()))
                    await db.commit()
                    won = cursor.rowcount == 1
                    await empty_wal(db, slot)
                    return won
            except sqlite3.OperationalError as e:
                if primary_code(e) not in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_CANTOPEN,
                ):
                    raise
                if time.time() > deadline:
                    raise NotRecorded(
                        f"the database stayed locked or missing: {e}"
                    ) from e
            await asyncio.sleep(0.2)
        raise NotRecorded("the server is stopping")

    async def stop(self) -> None:
        """Stop scheduling; a run in progress ends its attempt and gives up."""
        self.stopping = True
        self.scheduler.pause()
        await asyncio.sleep(0)  # a run submitted just now starts, and gives up
        async with self.run_lock:  # no run is in progress: shutting down cancels none
            self.scheduler.shutdown(wait=False)

    def state(self, last_run: dict | None) -> dict:
        """The schedule and the latest run; overdue if the latest slot has had no run
        for more than a minute after it was due."""
        now, job = time.time(), self.scheduler.get_job("heartbeat")
        latest = self.slot_at(now)
        ran = last_run is not None and str(last_run["slot"]) >= latest.isoformat()
        return {
            "running": self.scheduler.running,
            "interval_seconds": self.interval,
            "next_run_at": job.next_run_time.isoformat() if job else None,
            "last_run": last_run,
            "overdue": not ran and now - latest.timestamp() > 60,
        }


# Start-up ---------------------------------------------------------------------------


class StartupError(Exception):
    """Keeps the service from starting; its message is the operator's one line."""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings, path = app.state.settings, app.state.settings.db_path
    # Start-up: open the database, or stop with one line that says what is wrong.
    if not log.handlers:
        log.addHandler(handler := logging.StreamHandler())
        line = "%(levelname)s:     %(name)s[%(process)d] %(message)s"
        handler.setFormatter(logging.Formatter(line))
    log.setLevel(settings.log_level)
    if sqlite3.sqlite_version_info < (3, 35):  # for MATERIALIZED and NULLS LAST
        raise StartupError(
            f"SQLite 3.35 or newer is needed, not {sqlite3.sqlite_version}"
        )
    if not os.path.exists(path):
        raise StartupError(
            f"database {path} not found; create it with: python seed.py --db {path}"
        )
    database = Database(path, settings.query_timeout)
    await database.check()
    if database.current is None:
        await database.close()
        raise StartupError(database.problem)
    database.watching = asyncio.create_task(database.watch())
    heartbeat = Heartbeat(path, settings.heartbeat_interval)
    heartbeat.start()
    app.state.database, app.state.heartbeat = database, heartbeat
    yield
    # Shutdown: let a heartbeat run end, then close each connection once it is free.
    await heartbeat.stop()
    await database.close()


def one_line_startup_errors(app: Callable) -> Callable:
    """Wrap app so that the server gets a StartupError's one line, not a traceback."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        held = []  # the router's report of a failed start-up, with the traceback

        async def hold_failure(message: dict) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await app(scope, receive, hold_failure)
        except StartupError as e:
            await send({"type": "lifespan.startup.failed", "message": str(e)})
            raise
        except BaseException:
            for message in held:
                await send(message)
            raise

    return wrapped


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service with these settings, or with the environment's."""
    app = FastAPI(
        title="Ad Metrics API",
        version="2.0",
        lifespan=lifespan,
        redirect_slashes=False,  # an unknown path is a 404, with a slash or without
        exception_handlers={RequestValidationError: invalid, Exception: internal_error},
    )
    app.state.settings = settings or Settings.from_env(os.environ)
    # Added to the app itself: an APIRouter's routes would be matched twice a request.
    metrics = {"response_model": MetricsPage}
    responses = CSV_ANSWER | NOT_MODIFIED | UNAVAILABLE
    app.add_api_route("/metrics", get_metrics, responses=responses, **metrics)
    app.add_api_route(
        "/dimensions", get_dimensions, responses=NOT_MODIFIED | UNAVAILABLE
    )
    app.add_api_route("/health", health, responses=UNAVAILABLE)
    app.add_middleware(one_line_startup_errors)
    return app


app = create_app()

if __name__ == "__main__":
    settings = app.state.settings
    if not os.path.exists(settings.db_path):
        import seed

        print(f"{settings.db_path} not found: seeding it", file=sys.stderr)
        if seed.main(["--db", settings.db_path]):
            sys.exit(2)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # On SIGTERM, a request has the query time limit to end: a stalled download too.
        timeout_graceful_shutdown=math.ceil(settings.query_timeout),
    )
