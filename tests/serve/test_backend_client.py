"""The front's client to tritonserver (ttd/serve/backend_client.py) against canned answers: every
framing an HTTP/1.1 server may use, kept-alive connections reused only after a whole answer, and
an answer cut short raised as BackendGone (the front then retries once)."""

import asyncio

import pytest

from ttd.serve.backend_client import READ_LIMIT, BackendGone, BackendPool

pytestmark = pytest.mark.deadline(60)


def run_against(answers: list[bytes], exchange) -> tuple[object, list[bytes], int]:
    """Serve `answers` in turn (one per request received, each connection closed after an answer
    that ends with b"<close>"), run `exchange(pool)`; returns its result, the requests received and
    how many connections were opened."""
    received: list[bytes] = []
    opened = [0]

    async def main():
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            opened[0] += 1
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                received.append(head + await reader.readexactly(length))
                answer = answers.pop(0)
                close = answer.endswith(b"<close>")
                writer.write(answer.removesuffix(b"<close>"))
                await writer.drain()
                if close:
                    break
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        pool = BackendPool("127.0.0.1", server.sockets[0].getsockname()[1], 5, 5)
        try:
            return await exchange(pool)
        finally:
            pool.reset()
            server.close()

    return asyncio.run(main()), received, opened[0]


async def get(pool: BackendPool, method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
    answer = await pool.send(method, "/v2/x", {"Accept": "*/*"}, body)
    try:
        return answer.status, answer.headers, await answer.read()
    finally:
        answer.release()


def test_every_framing_is_read_and_the_connection_kept_alive():
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nInference-Header-Content-Length: 2\r\n\r\nhello",
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
               b"HTTP/1.1 204 No Content\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",  # HEAD: no body whatever the length says
               b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}",
               b"HTTP/1.1 200 OK\r\n\r\nuntil the end<close>"]

    async def exchange(pool):
        return [await get(pool), await get(pool), await get(pool), await get(pool, "HEAD"),
                await get(pool, "POST", b'{"inputs": []}'), await get(pool)]

    got, received, opened = run_against(answers, exchange)
    assert [(status, body) for status, _, body in got] == [
        (200, b"hello"), (200, b"abcde"), (204, b""), (200, b""), (400, b"{}"), (200, b"until the end")]
    assert got[0][1]["inference-header-content-length"] == "2"
    assert opened == 1  # one kept-alive connection for all six
    assert received[4].startswith(b"POST /v2/x HTTP/1.1\r\n") and b"Content-Length: 14\r\n" in received[4]
    assert received[4].endswith(b'\r\n\r\n{"inputs": []}') and b"Accept: */*\r\n" in received[0]


def test_a_connection_goes_back_to_the_pool_only_after_a_whole_answer():
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok<close>",
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    async def exchange(pool):
        answer = await pool.send("GET", "/a", {}, None)
        answer.release()  # unread: this connection cannot carry another request
        return [await get(pool), await get(pool), await get(pool)]

    got, _, opened = run_against(answers, exchange)
    assert [body for _, _, body in got] == [b"ok", b"ok", b"ok"]
    assert opened == 3  # the unread answer's connection and the one tritonserver closed were not reused


def test_an_answer_cut_short_is_backend_gone():
    for cut in (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc<close>",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab<close>",
                b"HTTP/1.1 200 OK\r\nContent-Le<close>",
                b"<close>"):
        with pytest.raises(BackendGone, match="closed the connection before"):
            run_against([cut], get)
    with pytest.raises(BackendGone, match="does not start with an HTTP status line"):
        run_against([b"SSH-2.0-OpenSSH\r\n\r\n<close>"], get)


def test_nothing_listening_is_backend_gone():
    async def main():
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        await BackendPool("127.0.0.1", port, 5, 5).send("GET", "/", {}, None)

    with pytest.raises(BackendGone, match="cannot connect to tritonserver"):
        asyncio.run(main())


def test_a_large_answer_streams_in_pieces_with_reading_paused_in_between():
    size = 3 * READ_LIMIT
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size]

    async def exchange(pool):
        answer = await pool.send("GET", "/big", {}, None)
        pieces, most_buffered = [], 0
        async for piece in answer.chunks():
            pieces.append(len(piece))
            await asyncio.sleep(0.02)  # a slow reader: what arrives meanwhile is buffered, up to the limit
            most_buffered = max(most_buffered, len(answer.link.buffer))
        answer.release()
        return sum(pieces), len(pieces), most_buffered

    (total, count, most_buffered), _, _ = run_against(answers, exchange)
    assert total == size and count > 1
    assert most_buffered <= 2 * READ_LIMIT  # paused past the limit: never the whole answer in memory
