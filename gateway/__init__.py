"""Gateway: the HTTP and gRPC front door (never imports torch or the engine)."""

import os

# gRPC's c-ares resolver can abort the process when the gateway starts a child (siblings
# of --processes, shadow helpers) while a resolution is pending: "ares_resolver.cc Check
# failed: channel_ != nullptr" (grpc/grpc#39827), seen once in CI under `breakwater up`.
# Upstreams are host:port addresses; the native resolver (getaddrinfo) serves them.
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
