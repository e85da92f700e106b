"""A local S3-compatible server (moto's server mode) in a process of its own, for the tests and
the benchmarks: deltalake calls that hold the GIL would starve a server thread."""

import socket
import subprocess
import sys
import time


def start_s3_server(bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """(the server process, storage options that reach it) with `bucket` created.
    ImportError if moto[server] is not installed."""
    import boto3
    import moto.server  # noqa: F401

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the local S3 server did not start") from None
            time.sleep(0.1)
    options = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=options["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing"
                 ).create_bucket(Bucket=bucket)
    return server, options
