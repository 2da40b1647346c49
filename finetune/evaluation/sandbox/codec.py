"""Plain data as json with type tags, in length-prefixed frames: the one wire format of the judge and the
candidate. Each of them runs with this file ahead of its own (sandbox.program), under `python -I -S`, so it
uses the standard library only; imported, it only defines."""
import itertools, json, os


class NotPlain(Exception):
    """args[0]: the type that is not plain data, or why the value cannot travel."""


SMALL = 1 << 62  # bigger ints travel as hex: json refuses ints of over 4300 digits
SCALARS = {type(None), bool, int, float, str}
TAGS = {list: "L", tuple: "T", set: "S", frozenset: "F"}
BUILD = {"L": list, "T": tuple, "S": set, "F": frozenset}


def scalars(items):
    """Whether all `items` go into json as they are; checked at C speed, so that a list of a million
    numbers costs a fraction of a second, not seconds."""
    kinds = set(map(type, items))
    if int not in kinds:
        return kinds <= SCALARS
    return kinds <= {int, bool} and -SMALL < min(items) and max(items) < SMALL


def encode(value, other=None, depth=0):
    """Plain data by exact type (a subclass could bring its own __eq__); `other(value, depth)` encodes
    anything else or raises NotPlain."""
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is str:
        return value
    if kind is int:
        return value if -SMALL < value < SMALL else ["I", format(value, "x")]
    if depth > 100:
        raise NotPlain("nested over 100 deep")
    if kind in TAGS or kind is dict:
        items = list(itertools.chain.from_iterable(value.items())) if kind is dict else list(value)
        return [TAGS.get(kind, "D"), *(items if scalars(items) else (encode(item, other, depth + 1) for item in items))]
    if kind is bytes:
        return ["B", value.hex()]
    if kind is complex:
        return ["C", value.real, value.imag]
    if other is None:
        raise NotPlain(kind)
    return other(value, depth)


def decode(data, handles=None, depth=0):
    """The inverse of encode, strict; ["H", i] is the candidate's handles[i] where it keeps them."""
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is not list or not data or type(data[0]) is not str or depth > 100:
        raise ValueError("not an encoded value")
    if data[0] == "H" and handles is not None and len(data) == 2 and type(data[1]) is int and data[1] >= 0:
        return handles[data[1]]
    tag, items = data[0], data[1:]
    if not set(map(type, items)) <= SCALARS:
        items = [decode(item, handles, depth + 1) for item in items]
    if tag in BUILD:
        return BUILD[tag](items)
    if tag == "D" and len(items) % 2 == 0:
        return dict(zip(items[::2], items[1::2]))
    if tag in ("I", "B") and len(items) == 1 and type(items[0]) is str:
        return int(items[0], 16) if tag == "I" else bytes.fromhex(items[0])
    if tag == "C" and len(items) == 2 and all(type(item) is float for item in items):
        return complex(*items)
    raise ValueError("not an encoded value")


def send(fd, message):
    data = json.dumps(message, separators=(",", ":"), check_circular=False).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd, limit=64 << 20):
    size = int.from_bytes(read_exactly(fd, 4), "big")
    if size > limit:
        raise ValueError("an oversized message")
    return json.loads(read_exactly(fd, size))


def read_exactly(fd, size):
    data = bytearray()  # not bytes: += would copy all that came before, chunk after chunk
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
