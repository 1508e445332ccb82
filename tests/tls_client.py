#!/usr/bin/env python3
"""An independent BEEP client for apexd's tuning (RFC 3080 §3, §4): Python's ssl module (or
OpenSSL's s_client) for TLS and a hand-written SCRAM-SHA-256 (RFC 5802 / RFC 7677), so that
apexd's TLS and SASL are checked against code that shares nothing with it.

    tls_client.py scram  --port P --ca CA.pem --name example.com --user U --password PW --attach E
    tls_client.py plain  (same arguments): PLAIN (RFC 4616) under TLS
    tls_client.py s_client --port P --ca CA.pem --name example.com

Prints one line per step and exits 0 when the last step gave what it should; the Rust test
(tests/security.rs) checks the lines.
"""

import argparse
import base64
import hashlib
import hmac
import os
import re
import socket
import ssl
import subprocess
import sys
import threading

HEADER = re.compile(rb"^(MSG|RPY|ERR|ANS|NUL) (\d+) (\d+) ([.*]) (\d+) (\d+)(?: (\d+))?\r\n")
SEQ = re.compile(rb"^SEQ (\d+) (\d+) (\d+)\r\n")


class Beep:
    """Just enough of a BEEP initiator: frames in and out, one message per frame."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = b""
        self.seqno = {}  # channel -> next seqno we send
        self.msgno = {}  # channel -> next msgno we send

    def read_more(self):
        chunk = self.stream.recv(65536)
        if not chunk:
            raise EOFError("the relay closed the connection")
        self.buf += chunk

    def frame(self):
        """The next complete message (keyword, channel, msgno, payload); SEQs are skipped."""
        payload = b""
        while True:
            while b"\r\n" not in self.buf:
                self.read_more()
            seq = SEQ.match(self.buf)
            if seq:
                self.buf = self.buf[seq.end():]
                continue
            m = HEADER.match(self.buf)
            if not m:
                raise ValueError("not a BEEP frame: %r" % self.buf[:60])
            size = int(m.group(6))
            while len(self.buf) < m.end() + size + 5:
                self.read_more()
            body = self.buf[m.end():m.end() + size]
            if self.buf[m.end() + size:m.end() + size + 5] != b"END\r\n":
                raise ValueError("frame without END")
            self.buf = self.buf[m.end() + size + 5:]
            payload += body
            if m.group(4) == b".":
                return m.group(1).decode(), int(m.group(2)), int(m.group(3)), payload

    def send(self, keyword, channel, msgno, payload):
        seqno = self.seqno.get(channel, 0)
        head = "%s %d %d . %d %d\r\n" % (keyword, channel, msgno, seqno, len(payload))
        self.seqno[channel] = seqno + len(payload)
        self.stream.sendall(head.encode() + payload + b"END\r\n")

    def msg(self, channel, payload):
        msgno = self.msgno.get(channel, 1 if channel == 0 else 0)
        self.msgno[channel] = msgno + 1
        self.send("MSG", channel, msgno, payload)
        return msgno

    def greeting(self):
        keyword, channel, msgno, payload = self.frame()
        assert (keyword, channel, msgno) == ("RPY", 0, 0), (keyword, channel, msgno, payload)
        self.send("RPY", 0, 0, b"Content-Type: application/beep+xml\r\n\r\n<greeting />")
        return payload.decode()

    def reply(self, channel):
        """The next reply on `channel` (messages on other channels are not expected)."""
        keyword, on, _, payload = self.frame()
        assert on == channel, (keyword, on, payload)
        return keyword, payload.decode()

    def start(self, channel, uri, piggyback=None):
        content = "" if piggyback is None else "<![CDATA[%s]]>" % piggyback
        doc = "<start number='%d'><profile uri='%s'>%s</profile></start>" % (channel, uri, content)
        self.msg(0, b"Content-Type: application/beep+xml\r\n\r\n" + doc.encode())
        return self.reply(0)


def profile_content(reply):
    m = re.search(r"<!\[CDATA\[(.*)\]\]>", reply, re.S)
    return m.group(1) if m else None


def blob_of(text):
    m = re.search(r"<blob[^>]*>([^<]*)</blob>|<blob[^>]*/>", text)
    assert m, "no blob in %r" % text
    return base64.b64decode(m.group(1) or "")


def start_tls(args):
    """greeting -> TLS (piggybacked ready) -> handshake; returns the TLS stream."""
    raw = socket.create_connection(("127.0.0.1", args.port), timeout=10)
    beep = Beep(raw)
    greeting = beep.greeting()
    print("greeting", " ".join(re.findall(r"uri='([^']*)'", greeting)))
    keyword, reply = beep.start(1, "http://iana.org/beep/TLS", "<ready />")
    assert keyword == "RPY" and "<proceed" in (profile_content(reply) or ""), reply
    print("proceed")
    assert not beep.buf, "octets after proceed: %r" % beep.buf
    return raw


def handshake(raw, args):
    context = ssl.create_default_context(cafile=args.ca)
    stream = context.wrap_socket(raw, server_hostname=args.name)
    print("tls", stream.version(), stream.cipher()[0])
    return stream


def scram(beep, args):
    """SCRAM-SHA-256 with the client-first message piggybacked in the start."""
    nonce = base64.b64encode(os.urandom(18)).decode()
    user = args.user.replace("=", "=3D").replace(",", "=2C")
    first_bare = "n=%s,r=%s" % (user, nonce)
    blob = "<blob>%s</blob>" % base64.b64encode(("n,," + first_bare).encode()).decode()
    keyword, reply = beep.start(3, "http://iana.org/beep/SASL/SCRAM-SHA-256", blob)
    if keyword != "RPY":
        print("sasl refused", reply.strip())
        return False
    server_first = blob_of(profile_content(reply)).decode()
    fields = dict(f.split("=", 1) for f in server_first.split(","))
    assert fields["r"].startswith(nonce), server_first
    salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
    salted = hashlib.pbkdf2_hmac("sha256", args.password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    final_bare = "c=biws,r=%s" % fields["r"]
    auth_message = ",".join([first_bare, server_first, final_bare]).encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    final = "%s,p=%s" % (final_bare, base64.b64encode(proof).decode())
    beep.msg(3, b"Content-Type: application/beep+xml\r\n\r\n<blob>"
             + base64.b64encode(final.encode()) + b"</blob>")
    keyword, reply = beep.reply(3)
    if keyword != "RPY":
        print("sasl failed", reply.strip().splitlines()[-1])
        return False
    assert "status='complete'" in reply, reply
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    verifier = blob_of(reply).decode()
    assert verifier == "v=" + base64.b64encode(expected).decode(), "server signature"
    print("authenticated scram")
    return True


def plain(beep, args):
    message = b"\0" + args.user.encode() + b"\0" + args.password.encode()
    blob = "<blob>%s</blob>" % base64.b64encode(message).decode()
    keyword, reply = beep.start(3, "http://iana.org/beep/SASL/PLAIN", blob)
    if keyword != "RPY" or "status='complete'" not in reply:
        print("sasl failed", reply.strip().splitlines()[-1])
        return False
    print("authenticated plain")
    return True


def attach(beep, endpoint):
    doc = "<attach endpoint='%s' transID='1' />" % endpoint
    keyword, reply = beep.start(5, "http://iana.org/beep/APEX", doc)
    print("attach", (profile_content(reply) or reply.strip().splitlines()[-1]).strip())


def sasl_then_attach(args, mechanism):
    stream = handshake(start_tls(args), args)
    beep = Beep(stream)
    greeting = beep.greeting()
    print("greeting", " ".join(re.findall(r"uri='([^']*)'", greeting)))
    if mechanism(beep, args):
        attach(beep, args.attach)


def s_client(args):
    """TLS by OpenSSL's s_client: this script does the BEEP steps before TLS, then hands the
    connection to s_client through a loopback relay of octets and reads the new greeting."""
    raw = start_tls(args)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", args.ca,
         "-servername", args.name, "-verify_return_error", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    accepted, _ = listener.accept()

    def pump(src, dst):
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                dst.sendall(chunk)
        except OSError:
            pass

    for src, dst in ((accepted, raw), (raw, accepted)):
        threading.Thread(target=pump, args=(src, dst), daemon=True).start()
    try:
        line = client.stdout.readline()
        assert line.startswith(b"RPY 0 0 . 0 "), line
        size = int(line.split()[5])
        payload = client.stdout.read(size + 5)
        print("s_client greeting", " ".join(re.findall(r"uri='([^']*)'", payload.decode())))
    finally:
        client.kill()
        client.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["scram", "plain", "s_client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--name", default="example.com")
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--attach", default="")
    args = parser.parse_args()
    if args.mode == "scram":
        sasl_then_attach(args, scram)
    elif args.mode == "plain":
        sasl_then_attach(args, plain)
    else:
        s_client(args)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - the test reads the reason
        print("error", type(e).__name__, e)
        sys.exit(1)
