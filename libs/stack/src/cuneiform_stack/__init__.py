"""The embedded local stack: nats-server, PostgreSQL and an S3 endpoint on free loopback ports.

with LocalStack(Path(".cuneiform/stack")) as stack:
    print(stack.endpoints.as_env())
"""

from cuneiform_stack.errors import StackError
from cuneiform_stack.stack import LocalStack, ServerStatus, StackEndpoints, StackStatus

__all__ = ["LocalStack", "ServerStatus", "StackEndpoints", "StackError", "StackStatus"]
