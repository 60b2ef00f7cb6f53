"""The throwaway redis-server the tests and the chaos suite share."""

from loadtest.redis_server import RedisServer

__all__ = ["RedisServer"]
