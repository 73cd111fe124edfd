"""Ad Metrics API: daily advertising metrics from a SQLite star schema, with a cron job
that logs a heartbeat every 6 hours. Top down: the settings and the models (the
contract), the SQL, the database, the heartbeat, then the app and its routes."""

import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Annotated, Literal
from urllib.parse import quote

import aiosqlite
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core.core_schema import ValidationInfo

log = logging.getLogger("ad_metrics")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


# The settings -----------------------------------------------------------------------
class Settings(BaseModel):
    """The configuration, from the environment variables that the aliases name."""

    db_path: str = Field("ads.db", alias="ADS_DB")
    host: str = Field("127.0.0.1", alias="HOST")
    port: int = Field(8000, alias="PORT", ge=1, le=65535)
    heartbeat_interval: int = Field(21600, alias="HEARTBEAT_INTERVAL_SECONDS", ge=1)
    log_level: LogLevel = Field("INFO", alias="LOG_LEVEL")
    query_timeout: float = Field(10, alias="QUERY_TIMEOUT_SECONDS", gt=0, le=3600)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Read the settings; a bad value stops start-up with one line naming it."""
        try:
            return cls.model_validate(env)
        except ValidationError as e:
            error = e.errors()[0]
            raise SystemExit(f"{error['loc'][0]}={error['input']!r}: {error['msg']}")


settings = Settings.from_env(os.environ)


# The models: what a request may ask, and what it is answered ------------------------
# Each dimension: its name in the API, then its table, id column and name column.
DIMENSIONS = {
    "region": ("dim_region", "region_id", "region_name"),
    "age_group": ("dim_age_group", "age_id", "age_range"),
    "gender": ("dim_gender", "gender_id", "gender_name"),
    "platform": ("dim_platform", "platform_id", "platform_name"),
    "placement": ("dim_placement", "placement_id", "placement_name"),
    "device_type": ("dim_device_type", "device_type_id", "device_type_name"),
}
PERIODS = ["date", "week", "month"]
GroupField = Literal[*PERIODS, *DIMENSIONS]  # any period or dimension
DATES = ("dim_date", "date_id", "date_value")  # where date, week and month come from
GRAIN = ["date", *DIMENSIONS]  # the default breakdown: a row per fact row
COUNTS = ["impressions", "clicks", "cost", "conversions", "likes"]
METRICS = [*COUNTS, "ctr", "cpc", "cpm", "cpa", "conversion_rate"]
NAMES_HELP = "Only rows with these names (see /dimensions), in any case; repeat."
MISSING = "database {0} is missing; create it with: python seed.py --db {0}"
UNREADABLE = "database {0} cannot be read ({1}); {2}"
POINT_ADS_DB = "point ADS_DB at an ad-metrics file"


class MetricsQuery(BaseModel):
    """The query string of GET /metrics: the filters, the breakdown, order and page."""

    model_config = ConfigDict(extra="forbid")

    start_date: date | None = Field(None, description="The first day, YYYY-MM-DD.")
    end_date: date | None = Field(None, description="The last day, YYYY-MM-DD.")
    region: list[str] = Field([], description=NAMES_HELP)
    age_group: list[str] = Field([], description=NAMES_HELP)
    gender: list[str] = Field([], description=NAMES_HELP)
    platform: list[str] = Field([], description=NAMES_HELP)
    placement: list[str] = Field([], description=NAMES_HELP)
    device_type: list[str] = Field([], description=NAMES_HELP)
    group_by: list[GroupField] = Field(GRAIN, description="At most one period.")
    sort: list[str] = Field([], description="Answer fields; '-' for descending.")
    limit: int = Field(100, ge=1, le=1000, description="The rows on a page.")
    offset: int = Field(0, ge=0, le=2**63 - 1, description="The rows to skip.")

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def written_as_dates(cls, value: object) -> object:
        """Refuse a number or a datetime, which pydantic would take as a date."""
        if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError("a date is written YYYY-MM-DD")
        return value

    @field_validator("end_date")
    @classmethod
    def end_after_start(cls, end: date | None, info: ValidationInfo) -> date | None:
        start = info.data.get("start_date")
        if start and end and end < start:
            raise ValueError(f"end_date {end} is before start_date {start}")
        return end

    @field_validator("group_by")
    @classmethod
    def check_group_by(cls, fields: list[str]) -> list[str]:
        if len(set(fields)) < len(fields) or len(set(fields) & set(PERIODS)) > 1:
            raise ValueError("name each field once, and at most one period")
        return fields

    @field_validator("sort")
    @classmethod
    def sort_by_answer_fields(cls, sort: list[str], info: ValidationInfo) -> list[str]:
        if "group_by" not in info.data:  # it failed: its own error says so
            return sort
        fields = [*info.data["group_by"], *METRICS]
        for item in sort:
            if item.removeprefix("-") not in fields:
                valid = ", ".join(fields)
                raise ValueError(f"{item!r} is not one of {valid}, with or without -")
        return sort


class Metrics(BaseModel):
    """The counts of a group, or of every matching row, and the ratios of their sums
    to 6 decimals; a ratio is null when its denominator is 0."""

    impressions: int
    clicks: int
    cost: float = Field(description="Rounded to cents.")
    conversions: int
    likes: int
    ctr: float | None = Field(description="clicks / impressions")
    cpc: float | None = Field(description="cost / clicks")
    cpm: float | None = Field(description="1000 * cost / impressions")
    cpa: float | None = Field(description="cost / conversions")
    conversion_rate: float | None = Field(description="conversions / clicks")

    @field_validator("cost", "ctr", "cpc", "cpm", "cpa", "conversion_rate")
    @classmethod
    def as_decimal(cls, value: float | None, info: ValidationInfo) -> float | None:
        """Turn SQL's rounded value into the float that prints as its decimal: SQLite's
        round() can give 1.0620560000000001 for 1.062056."""
        places = 2 if info.field_name == "cost" else 6
        return None if value is None else round(value, places)


class Group(BaseModel):
    """The group_by fields of a row; a name is null where its id is not in its table."""

    date: str | None = None
    week: str | None = Field(None, description="The week's Monday, YYYY-MM-DD.")
    month: str | None = Field(None, description="YYYY-MM")
    region: str | None = None
    age_group: str | None = None
    gender: str | None = None
    platform: str | None = None
    placement: str | None = None
    device_type: str | None = None


class Row(Metrics, Group):
    """A row of the answer: the group_by fields it was asked for, then its metrics."""


class Paging(BaseModel):
    limit: int
    offset: int
    total_rows: int = Field(description="The rows of the whole answer, on all pages.")
    next: str | None = Field(description="The next page's URL; null on the last.")


class MetricsPage(BaseModel):
    data: list[Row]
    totals: Metrics = Field(description="Over every matching row, not only the page.")
    paging: Paging


class DateRange(BaseModel):
    first: str | None
    last: str | None


class Dimensions(BaseModel):
    """Each dimension's names, in id order, and the first and last date."""

    date: DateRange
    region: list[str]
    age_group: list[str]
    gender: list[str]
    platform: list[str]
    placement: list[str]
    device_type: list[str]


class SchedulerState(BaseModel):
    running: bool
    next_run_at: datetime | None = Field(description="The next run, in UTC.")
    last_run: datetime | None = Field(description="This worker's last run, in UTC.")


class Health(BaseModel):
    status: Literal["ok"]
    scheduler: SchedulerState


# The SQL ----------------------------------------------------------------------------
# Table and column names come only from the constants here; every value is a parameter.
# What each group_by field shows: a week is its Monday, a name is read as text.
LABELS = {
    "date": "dim_date.date_value",
    "week": "date(dim_date.date_value, 'weekday 0', '-6 days')",
    "month": "substr(dim_date.date_value, 1, 7)",
} | {
    dim: f"CAST({table}.{name} AS TEXT)" for dim, (table, _, name) in DIMENSIONS.items()
}
# The counts of a fact row f, a null counted as 0; the counts of rows, added up.
COUNTS_SQL = ", ".join(f"coalesce(f.{count}, 0) AS {count}" for count in COUNTS)
SUMS_SQL = ", ".join(f"coalesce(sum({count}), 0) AS {count}" for count in COUNTS)
# The ten metrics of a row of counts, as the answer shows and sorts them: cost to the
# cent, and each ratio (of the cost before rounding) to 6 decimals.
METRICS_SQL = """impressions, clicks, round(cost, 2) AS cost, conversions, likes,
    round(1.0 * clicks / nullif(impressions, 0), 6) AS ctr,
    round(1.0 * cost / nullif(clicks, 0), 6) AS cpc,
    round(1000.0 * cost / nullif(impressions, 0), 6) AS cpm,
    round(1.0 * cost / nullif(conversions, 0), 6) AS cpa,
    round(1.0 * conversions / nullif(clicks, 0), 6) AS conversion_rate"""


def facts_sql(fields: list[str], where: str = "", dated: bool = False) -> str:
    """Select the fact rows that pass `where`, with the labels of `fields` and the
    counts. Each field's table is joined; so is dim_date when `dated`, for a WHERE
    on dates. LEFT JOIN keeps a fact row whose id is missing from a table."""
    joined = [*fields, "date"] if dated else fields
    tables = []
    for field in joined:
        table, id_column, _ = DIMENSIONS.get(field, DATES)
        join = f"LEFT JOIN {table} ON {table}.{id_column} = f.{id_column}"
        if join not in tables:  # date and the date range share one join
            tables.append(join)
    labels = "".join(f"{LABELS[field]} AS {field}, " for field in fields)
    joins = " ".join(tables)
    return (
        f"SELECT {labels}{COUNTS_SQL} FROM fact_ad_metrics_daily AS f {joins} {where}"
    )


# A statement that reads no row, but fails if a table or a column is not in the file.
SCHEMA_SQL = f"{facts_sql(GRAIN)} LIMIT 0"


def where_sql(query: MetricsQuery, ids: dict[str, list[int]]) -> tuple[str, list]:
    """The WHERE clause of the date range and the filters' ids, with its parameters."""
    terms, params = [], []
    if query.start_date or query.end_date:
        terms.append("dim_date.date_value BETWEEN ? AND ?")
        params += [str(query.start_date or date.min), str(query.end_date or date.max)]
    for dim, dim_ids in ids.items():
        id_column = DIMENSIONS[dim][1]
        terms.append(f"f.{id_column} IN ({', '.join('?' for _ in dim_ids)})")
        params += dim_ids
    return (f"WHERE {' AND '.join(terms)}" if terms else ""), params


def order_sql(query: MetricsQuery) -> str:
    """The sort, then the group_by fields not in it; null last either way."""
    sorted_fields = [item.removeprefix("-") for item in query.sort]
    terms = []
    for item in query.sort + [f for f in query.group_by if f not in sorted_fields]:
        direction = "DESC" if item.startswith("-") else "ASC"
        terms.append(f"{item.removeprefix('-')} {direction} NULLS LAST")
    return ", ".join(terms)


# The database -----------------------------------------------------------------------
def connect() -> aiosqlite.Connection:
    """Open the data file read-only, so that SQLite neither writes nor creates it;
    SQLite waits up to the time limit for another process's lock."""
    uri = f"file:{quote(os.path.abspath(settings.db_path))}?mode=ro"
    return aiosqlite.connect(uri, uri=True, timeout=settings.query_timeout)


async def schema_error() -> sqlite3.Error | None:
    """Why the data file cannot be served (not a database, or a table missing)."""
    try:
        async with connect() as db:
            await db.execute(SCHEMA_SQL)
    except sqlite3.Error as error:
        return error
    return None


async def get_db() -> AsyncIterator[aiosqlite.Connection]:
    """Open a new connection for each request, so that a replaced or removed file is
    noticed at once. SQLite stops a statement that runs past the time limit. Errors
    caused by the file become 503s; an error in our own SQL stays a 500."""
    if not os.path.exists(settings.db_path):
        raise HTTPException(503, MISSING.format(settings.db_path))
    deadline = time.monotonic() + settings.query_timeout
    try:
        async with connect() as db:
            await db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
            db.row_factory = sqlite3.Row
            yield db
    except sqlite3.Error as error:
        name = getattr(error, "sqlite_errorname", "SQLITE_ERROR")
        if name == "SQLITE_INTERRUPT":
            took = f"the query took over {settings.query_timeout:g} s and was stopped"
            advice = "narrow the dates, add filters or group by fewer fields"
            raise HTTPException(503, f"{took}; {advice}") from None
        if name == "SQLITE_ERROR" and not await schema_error():
            raise  # the file is sound: the statement is at fault
        advice = "try again" if name == "SQLITE_BUSY" else POINT_ADS_DB
        reason = UNREADABLE.format(settings.db_path, error, advice)
        raise HTTPException(503, reason) from None


DbDep = Annotated[aiosqlite.Connection, Depends(get_db)]


async def names_of(db: aiosqlite.Connection, dim: str) -> list[tuple[int, str]]:
    """A dimension's ids and names, in id order; a name is read as text."""
    table, id_column, name_column = DIMENSIONS[dim]
    return await db.execute_fetchall(
        f"SELECT {id_column}, CAST({name_column} AS TEXT) FROM {table}"
        f" WHERE {name_column} IS NOT NULL ORDER BY {id_column}"
    )


async def filter_ids(db: aiosqlite.Connection, query: MetricsQuery) -> dict:
    """Each filter's names as the ids that have them, in any case; an unknown name is
    FastAPI's 422, listing the known ones."""
    ids = {}
    for dim in DIMENSIONS:
        if not (names := getattr(query, dim)):
            continue
        known = await names_of(db, dim)
        known_names = [known_name.casefold() for _, known_name in known]
        for name in names:
            if name.casefold() not in known_names:
                valid = ", ".join(known_name for _, known_name in known)
                message = f"{dim} {name!r} is not one of: {valid}"
                error = {"type": "value_error", "loc": ("query", dim), "msg": message}
                raise RequestValidationError([{**error, "input": names}])
        wanted = [name.casefold() for name in names]
        ids[dim] = [i for i, known_name in known if known_name.casefold() in wanted]
    return ids


# For group_by=month&region=Oceania&sort=-cost, answer() runs these statements:
#   CREATE TEMP TABLE groups AS SELECT month, <SUMS_SQL> FROM (
#       SELECT substr(dim_date.date_value, 1, 7) AS month, <COUNTS_SQL>
#       FROM fact_ad_metrics_daily AS f
#       LEFT JOIN dim_date ON dim_date.date_id = f.date_id WHERE f.region_id IN (?)
#   ) GROUP BY month
#   SELECT month, <METRICS_SQL> FROM groups
#       ORDER BY cost DESC NULLS LAST, month ASC NULLS LAST LIMIT ? OFFSET ?
#   SELECT total_rows, <METRICS_SQL>
#       FROM (SELECT count(*) AS total_rows, <SUMS_SQL> FROM groups)
# The default breakdown reads its page and totals from the fact rows instead.
async def answer(
    db: aiosqlite.Connection, query: MetricsQuery
) -> tuple[list, dict, int]:
    """The rows of a query's page, its totals, and the number of all its rows."""
    where, params = where_sql(query, await filter_ids(db, query))
    dated = bool(query.start_date or query.end_date)
    facts = facts_sql(query.group_by, where, dated)
    fields = ", ".join(query.group_by)
    if set(query.group_by) == set(GRAIN):  # a row per fact row: nothing to add up
        page_from = f"({facts})"
        totals_from = f"({facts_sql([], where, dated)})"  # the totals need no names
    else:  # add the groups up once, into a temporary table of this connection
        groups = f"SELECT {fields}, {SUMS_SQL} FROM ({facts}) GROUP BY {fields}"
        await db.execute(f"CREATE TEMP TABLE groups AS {groups}", params)
        page_from = totals_from = "groups"
        params = []  # the filters are applied: the table holds only matching groups
    order = order_sql(query)
    page_sql = f"SELECT {fields}, {METRICS_SQL} FROM {page_from} ORDER BY {order}"
    page_params = [*params, query.limit, query.offset]
    page = await db.execute_fetchall(f"{page_sql} LIMIT ? OFFSET ?", page_params)
    counts = f"SELECT count(*) AS total_rows, {SUMS_SQL} FROM {totals_from}"
    totals_sql = f"SELECT total_rows, {METRICS_SQL} FROM ({counts})"
    [totals_row] = await db.execute_fetchall(totals_sql, params)
    totals = dict(totals_row)
    total_rows = totals.pop("total_rows")
    return [dict(row) for row in page], totals, total_rows


# The heartbeat: the cron job --------------------------------------------------------
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def heartbeat(app: FastAPI) -> None:
    """Log that the job ran, with the time in UTC, and keep that time for /health."""
    ran_at = datetime.now(UTC)
    log.info("heartbeat: the job ran at %s", ran_at.isoformat(timespec="seconds"))
    app.state.last_heartbeat = ran_at


# The app ----------------------------------------------------------------------------
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Check the data file, then run the heartbeat in this event loop until shutdown.

    It runs once now, then every interval counted from the epoch, which for 6 hours
    is 00:00, 06:00, 12:00 and 18:00 UTC. A late run still runs, once. APScheduler
    logs a run that fails and keeps the schedule going.
    """
    logging.basicConfig(format="%(levelname)s:  %(name)s[%(process)d] %(message)s")
    log.setLevel(settings.log_level)
    if not os.path.exists(settings.db_path):
        raise RuntimeError(MISSING.format(settings.db_path))
    if error := await schema_error():
        raise RuntimeError(UNREADABLE.format(settings.db_path, error, POINT_ADS_DB))
    scheduler = AsyncIOScheduler(
        timezone=UTC, job_defaults={"misfire_grace_time": None}
    )
    grid = IntervalTrigger(seconds=settings.heartbeat_interval, start_date=EPOCH)
    scheduler.add_job(heartbeat, grid, args=[app], id="heartbeat")
    scheduler.add_job(heartbeat, args=[app])  # once, now
    app.state.last_heartbeat = None
    app.state.scheduler = scheduler
    scheduler.start()
    yield
    scheduler.shutdown()


UNAVAILABLE = {503: {"description": "The data cannot be read now; detail says why."}}
app = FastAPI(title="Ad Metrics API", lifespan=lifespan, responses=UNAVAILABLE)


# A row holds only its group_by fields: the others are unset, and left out.
@app.get("/metrics", response_model=MetricsPage, response_model_exclude_unset=True)
async def get_metrics(
    request: Request, query: Annotated[MetricsQuery, Query()], db: DbDep
) -> MetricsPage:
    """The metrics by `group_by`, filtered, sorted and paged, with their totals."""
    rows, totals, total_rows = await answer(db, query)
    following = query.offset + query.limit
    next_page = None
    if following < total_rows:  # the same query, further on
        url = request.url.include_query_params(offset=following)
        next_page = f"{url.path}?{url.query}"
    paging = Paging(
        limit=query.limit, offset=query.offset, total_rows=total_rows, next=next_page
    )
    return MetricsPage(data=rows, totals=totals, paging=paging)


@app.get("/dimensions", response_model=Dimensions)
async def get_dimensions(db: DbDep) -> Dimensions:
    """Each dimension's names in id order, and the first and last date."""
    dates = "SELECT min(date_value), max(date_value) FROM dim_date"
    [(first, last)] = await db.execute_fetchall(dates)
    names = {dim: [name for _, name in await names_of(db, dim)] for dim in DIMENSIONS}
    return Dimensions(date=DateRange(first=first, last=last), **names)


@app.get("/health", response_model=Health)
async def health(request: Request, db: DbDep) -> Health:
    """Whether the data file can be read, and when the heartbeat ran and runs next."""
    await db.execute(SCHEMA_SQL)
    scheduler = request.app.state.scheduler
    state = SchedulerState(
        running=scheduler.running,
        next_run_at=scheduler.get_job("heartbeat").next_run_time,
        last_run=request.app.state.last_heartbeat,
    )
    return Health(status="ok", scheduler=state)


if __name__ == "__main__":
    if not os.path.exists(settings.db_path):
        import seed

        if seed.main(["--db", settings.db_path]) != 0:
            raise SystemExit(1)
    log_level = settings.log_level.lower()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
