#!/usr/bin/env python3
"""Sends N valid-shaped POST /api/v1/messages/send requests with one API key over one keep-alive
connection and reports the status counts: the fixed workload of `bench/run.sh callgrind`.

usage: client.py HOST:PORT N KEY"""
import http.client
import sys
from collections import Counter

addr, n, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
host, port = addr.rsplit(":", 1)
body = b'{"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6","to":"+33612345000","type":"text","text":"Hello"}'
headers = {"x-api-key": key, "content-type": "application/json"}
conn = http.client.HTTPConnection(host, int(port), timeout=60)
statuses = Counter()
for _ in range(n):
    conn.request("POST", "/api/v1/messages/send", body, headers)
    resp = conn.getresponse()
    resp.read()
    statuses[resp.status] += 1
print(" ".join(f"{status}x{count}" for status, count in sorted(statuses.items())))
