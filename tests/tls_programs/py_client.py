"""An HTTPS client: waits for a line on stdin, then GETs each path on one connection and prints
each status.  Usage: PORT [-H 'Name: value'] PATH..."""
import http.client
import ssl
import sys

sys.stdin.readline()
port = int(sys.argv[1])
args = sys.argv[2:]
headers = {}
while args and args[0] == "-H":
    name, _, value = args[1].partition(": ")
    headers[name] = value
    args = args[2:]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
for path in args:
    connection.request("GET", path, headers=headers)
    reply = connection.getresponse()
    reply.read()
    print(reply.status, flush=True)
connection.close()
