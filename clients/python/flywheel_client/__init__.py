"""Python clients for Flywheel: gRPC (`FlywheelClient`, `AsyncFlywheelClient`), HTTP
(`HttpClient`, `AsyncHttpClient`), typed errors and the values they return."""

from flywheel_client.errors import (
    Conflict,
    FlywheelError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from flywheel_client.grpc_client import AsyncFlywheelClient, FlywheelClient
from flywheel_client.http_client import AsyncHttpClient, HttpClient
from flywheel_client.types import (
    AdapterVersion,
    ChallengeTally,
    Chunk,
    Comparison,
    Completion,
    DemonstrationReceipt,
    DemonstrationRecord,
    Generation,
    PromptRecord,
    RankedCompletion,
    RankingReceipt,
    RankingRecord,
    SamplingOptions,
    Scores,
    ServerInfo,
    Versions,
)

__all__ = [
    "AdapterVersion",
    "AsyncFlywheelClient",
    "AsyncHttpClient",
    "ChallengeTally",
    "Chunk",
    "Comparison",
    "Completion",
    "Conflict",
    "DemonstrationReceipt",
    "DemonstrationRecord",
    "FlywheelClient",
    "FlywheelError",
    "Generation",
    "HttpClient",
    "InvalidArgument",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PromptRecord",
    "RankedCompletion",
    "RankingReceipt",
    "RankingRecord",
    "SamplingOptions",
    "Scores",
    "ServerInfo",
    "Unauthenticated",
    "Unavailable",
    "Versions",
]
