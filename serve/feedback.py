"""What end users think of each adapter version: request ids, ratings, per-version aggregates.

Every generate response carries a request id; the gateway records which adapter versions that
request used. `POST /v1/feedback` rates a request (1-5 stars, or thumbs up/down, optional tags
and a comment); rating it again updates the rating. Stored in a real database through
SQLAlchemy: SQLite by default (one file, transactions, upserts, aggregates in SQL), PostgreSQL by
URL when several gateways must share it (both tested; a rating is one upsert, so gateways rating
the same request at once never collide). Not the registry's object storage: feedback is many
small rows that are updated and aggregated, which an object store can neither query nor
aggregate without reading every object.

Scores: stars map to (stars - 1) / 4, thumbs to 1 (up) or 0 (down); per version the mean score
with a 95 % interval (normal approximation, the sample standard deviation), the star mean and
the thumb counts.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Float, Integer, String, Text, case, create_engine, event, func, select
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from lorafleet.errors import ErrorKind, LorafleetError

REQUEST_ID_PATTERN = r"^req-[0-9a-f]{24}$"
logger = logging.getLogger(__name__)


class RequestNotFound(LorafleetError):
    code = "request_not_found"
    kind = ErrorKind.not_found


class FeedbackDatabaseUnavailable(LorafleetError):
    code = "feedback_database_unavailable"
    kind = ErrorKind.unavailable


class FeedbackSettings(BaseModel):
    enabled: bool = Field(True, description="Record request ids and accept POST /v1/feedback.")
    database_url: str = Field("sqlite:///~/.cache/lorafleet/feedback.db", description="SQLAlchemy URL: "
                              "sqlite:///PATH (default), or postgresql+psycopg://USER@HOST:PORT/DB "
                              "(pip install 'lorafleet[postgres]') when several gateways share it.")

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("a sqlite:///PATH or postgresql+psycopg://... URL (the databases feedback is tested on)")
        return url


class _Tables(DeclarativeBase):
    pass


class ServedRequest(_Tables):
    __tablename__ = "served_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class RequestAdapter(_Tables):
    __tablename__ = "request_adapters"

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class Rating(_Tables):
    __tablename__ = "ratings"

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    stars: Mapped[int | None] = mapped_column(Integer, nullable=True)
    thumb: Mapped[str | None] = mapped_column(String(4), nullable=True)
    tags: Mapped[str] = mapped_column(Text, default="[]")
    comment: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[float] = mapped_column(Float)


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="From the generate response.")
    tags: list[str] = Field(default_factory=list, max_length=16)
    comment: str = Field("", max_length=2000)


class StarFeedback(_FeedbackBase):
    rating: int = Field(ge=1, le=5, description="1 (bad) to 5 (great).")


class ThumbFeedback(_FeedbackBase):
    thumb: Literal["up", "down"]


class FeedbackRecorded(BaseModel):
    request_id: str
    adapters: list[str] = Field(description="name@version the request used.")
    updated: bool = Field(description="True when this request was rated before.")


class VersionFeedback(BaseModel):
    count: int
    mean_score: float = Field(description="0 (stars 1, thumbs down) to 1 (stars 5, thumbs up).")
    interval: tuple[float, float] = Field(description="95 % interval of the mean score.")
    stars_mean: float | None
    thumbs_up: int
    thumbs_down: int


@dataclass(frozen=True)
class RatedRequest:
    adapters: list[tuple[str, int]]
    updated: bool


class FeedbackStore:
    def __init__(self, url: str):
        self.engine, self._upsert = _open_database(url)
        _Tables.metadata.create_all(self.engine)
        self.lock = threading.Lock()  # SQLite: one writer at a time in this process
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-feedback")
        self.pending: dict[str, Future] = {}

    def record_request_later(self, request_id: str, tenant: str | None, adapters: list[tuple[str, int]]) -> None:
        """Record off the request path (a rating for it waits for the write)."""
        future = self.writer.submit(self._record_safely, request_id, tenant, adapters)
        self.pending[request_id] = future
        future.add_done_callback(lambda _: self.pending.pop(request_id, None))

    def _record_safely(self, request_id: str, tenant: str | None, adapters: list[tuple[str, int]]) -> None:
        try:
            self.record_request(request_id, tenant, adapters)
        except Exception:  # feedback must never cost a generation; the request just cannot be rated
            logger.warning("recording request %s for feedback failed", request_id, exc_info=True)

    def record_request(self, request_id: str, tenant: str | None, adapters: list[tuple[str, int]]) -> None:
        with self.lock, Session(self.engine) as session, session.begin():
            session.add(ServedRequest(id=request_id, tenant=tenant, created_at=time.time()))
            session.add_all(RequestAdapter(request_id=request_id, adapter=name, version=version)
                            for name, version in dict.fromkeys(adapters))

    def rate(self, body: StarFeedback | ThumbFeedback, tenant: str | None) -> RatedRequest:
        """Store (or replace) the rating of a request this tenant made; RequestNotFound otherwise."""
        pending = self.pending.get(body.request_id)
        if pending is not None:
            pending.result(timeout=30)
        with self.lock, Session(self.engine) as session, session.begin():
            served = session.get(ServedRequest, body.request_id)
            if served is None or (tenant is not None and served.tenant != tenant):
                raise RequestNotFound(f"no request {body.request_id}", field="request_id")
            adapters = [(row.adapter, row.version) for row in session.scalars(
                select(RequestAdapter).where(RequestAdapter.request_id == body.request_id))]
            existed = session.get(Rating, body.request_id) is not None
            stars = getattr(body, "rating", None)
            thumb = getattr(body, "thumb", None)
            score = (stars - 1) / 4 if stars is not None else (1.0 if thumb == "up" else 0.0)
            values = {"score": score, "stars": stars, "thumb": thumb, "tags": json.dumps(body.tags),
                      "comment": body.comment, "updated_at": time.time()}
            # One statement, so that another gateway rating the same request at once makes this an
            # update rather than a duplicate key.
            session.execute(self._upsert(Rating).values(request_id=body.request_id, **values)
                            .on_conflict_do_update(index_elements=[Rating.request_id], set_=values))
            return RatedRequest(adapters, existed)

    def by_version(self, adapter: str) -> dict[int, VersionFeedback]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(RequestAdapter.version, func.count(), func.avg(Rating.score),
                       func.avg(Rating.score * Rating.score), func.avg(Rating.stars),
                       func.sum(case((Rating.thumb == "up", 1), else_=0)),
                       func.sum(case((Rating.thumb == "down", 1), else_=0)))
                .join(Rating, Rating.request_id == RequestAdapter.request_id)
                .where(RequestAdapter.adapter == adapter).group_by(RequestAdapter.version)).all()
        return {version: _aggregate(count, mean, mean_square, stars, up, down)
                for version, count, mean, mean_square, stars, up, down in rows}


def _open_database(url: str):
    """(engine, the dialect's INSERT with ON CONFLICT) for a SQLite or PostgreSQL URL."""
    if url.startswith("sqlite:///~"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    sqlite = url.startswith("sqlite")
    try:
        engine = create_engine(url, pool_pre_ping=True, connect_args={"timeout": 30} if sqlite else {})
    except ModuleNotFoundError as exc:
        raise FeedbackDatabaseUnavailable(f"feedback.database_url needs the {exc.name} driver: pip install "
                                          "'lorafleet[postgres]'", field="feedback.database_url") from exc
    dialect = {"sqlite": sqlite_dialect, "postgresql": postgresql_dialect}.get(engine.dialect.name)
    if dialect is None:
        raise FeedbackDatabaseUnavailable(f"{engine.dialect.name}: feedback is stored in SQLite or PostgreSQL",
                                          field="feedback.database_url")
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine, dialect.insert


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, no fsync per request
    cursor.close()


def _aggregate(count: int, mean: float, mean_square: float, stars, up, down) -> VersionFeedback:
    variance = max(0.0, mean_square - mean * mean) * count / (count - 1) if count > 1 else 0.0
    half = 1.96 * math.sqrt(variance / count) if count > 1 else 1.0
    return VersionFeedback(count=count, mean_score=round(mean, 4),
                           interval=(round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)),
                           stars_mean=round(stars, 3) if stars is not None else None,
                           thumbs_up=int(up or 0), thumbs_down=int(down or 0))
