"""Calls every method of grpc_server.py once on one channel, and one call that fails.  Usage: PORT"""
import sys

import grpc

channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
say_hello = channel.unary_unary("/demo.Greeter/SayHello")
print(say_hello(b"world").decode())
print(len(list(channel.unary_stream("/demo.Greeter/ListHellos")(b"3"))))
print(channel.stream_unary("/demo.Greeter/CollectHellos")(iter([b"a", b"b", b"c", b"d"])).decode())
print(len(list(channel.stream_stream("/demo.Greeter/Chat")(iter([b"x", b"y"])))))
try:
    say_hello(b"fail")
except grpc.RpcError as error:
    print(error.code().name)
channel.close()
