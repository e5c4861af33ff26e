"""A gRPC server (grpcio, cleartext HTTP/2) on a free port of 127.0.0.1 (printed), messages as raw
bytes: demo.Greeter/SayHello (unary; b"fail" is NOT_FOUND), ListHellos (server streaming: as many
replies as the request says), CollectHellos (client streaming), Chat (bidirectional)."""
from concurrent import futures

import grpc


def say_hello(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such greeter: fail")
    return b"hello " + request


def list_hellos(request, context):
    for i in range(int(request)):
        yield b"hello %d" % i


def collect_hellos(requests, context):
    return b"%d" % sum(1 for _ in requests)


def chat(requests, context):
    for message in requests:
        yield message.upper()


handlers = {
    "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
    "ListHellos": grpc.unary_stream_rpc_method_handler(list_hellos),
    "CollectHellos": grpc.stream_unary_rpc_method_handler(collect_hellos),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Greeter", handlers),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
