"""An unmodified standard-library program using ``socket.AF_VSOCK`` (no import of ours), run
through ``hvsock run`` by test_run_shim.py.

    vsock_stdlib.py echo-server PORT COUNT          blocking, a thread per connection
    vsock_stdlib.py asyncio-echo-server PORT COUNT   asyncio streams on a listening socket
    vsock_stdlib.py client CID PORT NBYTES           blocking + selectors, and a TCP echo beside
    vsock_stdlib.py asyncio-client CID PORT NBYTES   non-blocking connect through the event loop
    vsock_stdlib.py rescind CID PORT                 read to EOF after a rescind, then send
    vsock_stdlib.py backpressure CID PORT            send without the peer reading
    vsock_stdlib.py exec CID PORT                    connect, then exec a program that inherits it

Each prints what it found, one line per fact, and exits 0 when all is as expected.
"""

import asyncio
import contextlib
import hashlib
import os
import selectors
import socket
import sys
import threading


def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def echo_server(port, count):
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as listener:
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen()
        print("LISTENING", listener.getsockname(), flush=True)
        threads = []
        for _ in range(count):
            conn, peer = listener.accept()
            print("accepted", peer, flush=True)
            thread = threading.Thread(target=echo, args=(conn,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()


async def asyncio_echo_server(port, count):
    done = asyncio.Event()
    served = 0

    async def handle(reader, writer):
        nonlocal served
        print("accepted", writer.get_extra_info("peername"), flush=True)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()
        served += 1
        if served == count:
            done.set()

    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen()
    listener.setblocking(False)
    server = await asyncio.start_server(handle, sock=listener)
    print("LISTENING", listener.getsockname(), flush=True)
    async with server:
        await done.wait()


def tcp_echo_check():
    """A TCP echo next to the vsock sockets: the kernel's, untouched."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        assert conn.family == socket.AF_INET and client.getpeername()[1] == port
        client.sendall(b"tcp" * 1000)
        got = b""
        while len(got) < 3000:
            got += conn.recv(65536)
        assert got == b"tcp" * 1000
        conn.close()
        client.close()
    print("tcp untouched", flush=True)


def client(cid, port, nbytes):
    tcp_echo_check()
    payload = os.urandom(nbytes)
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((cid, port))
    print("peer", sock.getpeername(), "local", sock.getsockname()[0], flush=True)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent, received, biggest = 0, hashlib.sha256(), 0
    got = 0
    view = memoryview(payload)
    while True:
        for _key, events in selector.select(10):
            if events & selectors.EVENT_WRITE:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(view[sent : sent + 65536])
                if sent == nbytes:
                    sock.shutdown(socket.SHUT_WR)  # half-close: the echo goes on
                    selector.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    selector.close()
                    sock.close()
                    same = received.hexdigest() == hashlib.sha256(payload).hexdigest()
                    print("echoed", got, "sha256", "ok" if same else "DIFFERENT", flush=True)
                    print("largest read", biggest, flush=True)
                    return 0 if same and got == nbytes else 1
                biggest = max(biggest, len(data))
                got += len(data)
                received.update(data)


async def asyncio_client(cid, port, nbytes):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (cid, port))  # EINPROGRESS, writable, SO_ERROR
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = os.urandom(nbytes)
    writer.write(payload)
    writer.write_eof()
    echoed = await reader.read()
    writer.close()
    same = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    print("asyncio echoed", len(echoed), "sha256", "ok" if same else "DIFFERENT", flush=True)
    return 0 if same else 1


def rescind(cid, port):
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((cid, port))
    print("CONNECTED", flush=True)
    total = 0
    while data := sock.recv(65536):
        total += len(data)
    print("read", total, "then EOF", flush=True)
    try:
        sock.send(b"x" * 1000)  # the first send after the end of stream fails already
    except BrokenPipeError:
        print("send EPIPE", flush=True)
        return 0
    print("send did not fail", flush=True)
    return 1


def backpressure(cid, port):
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((cid, port))
    sock.setblocking(False)
    total = 0
    block = b"b" * 65536
    while True:
        try:
            total += sock.send(block)
        except BlockingIOError:
            break
    print("blocked after", total, flush=True)
    sys.stdin.readline()  # the host reads everything now
    sock.setblocking(True)
    sock.sendall(b"!")
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""
    print("sent", total + 1, flush=True)
    return 0


def exec_parent(cid, port):
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((cid, port))
    sock.set_inheritable(True)
    fd = sock.detach()
    os.execv(sys.executable, [sys.executable, __file__, "exec-child", str(fd), str(port)])


def exec_child(fd, port):
    """After exec: the descriptor is still a vsock socket, to Python's socket() too."""
    sock = socket.socket(fileno=fd)
    print("inherited", sock.family == socket.AF_VSOCK, sock.getpeername(), flush=True)
    sock.sendall(b"after exec")
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while data := sock.recv(100):
        got += data
    print("echo", got.decode(), flush=True)
    return 0 if got == b"after exec" and sock.getpeername() == (2, port) else 1


def main(argv):
    mode, args = argv[1], [int(a) for a in argv[2:]]
    if mode == "echo-server":
        echo_server(*args)
        return 0
    if mode == "asyncio-echo-server":
        asyncio.run(asyncio_echo_server(*args))
        return 0
    if mode == "client":
        return client(*args)
    if mode == "asyncio-client":
        return asyncio.run(asyncio_client(*args))
    if mode == "rescind":
        return rescind(*args)
    if mode == "backpressure":
        return backpressure(*args)
    if mode == "exec":
        return exec_parent(*args)
    if mode == "exec-child":
        return exec_child(*args)
    print("unknown mode", mode, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
