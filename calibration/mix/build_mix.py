#!/usr/bin/env python3
"""Build polarc's broad, redistributable English calibration mix (calibration/mix.jsonl.gz).

Calibration on one kind of text fits plans and routers to that kind of text only; this mix spreads
3 M characters evenly over five domains (narrative, expository, reference, conversational, code) from
sources whose licences allow redistribution, so that what is calibrated on it holds on text of other
domains too.  Every record carries its text, domain, source (package/path) and licence; SOURCES.md
lists the sources.

Stdlib only.  Reads the archives fetched by fetch.sh (.deb files are read directly: ar container ->
data.tar.* via tarfile; sdists via tarfile), extracts clean text per domain, cuts paragraph-aligned
documents of ~1,000-4,000 characters, de-duplicates (exact, normalized-hash and MinHash
near-duplicates) and writes gzip'd JSON lines.  The output depends only on the archives and --seed.

Usage: python3 build_mix.py [--src DIR] [--out FILE] [--cap CHARS] [--seed N]
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_SRC = '/tmp/corpus/src'
DEFAULT_OUT = Path(__file__).parent.parent / 'mix.jsonl.gz'
MIN_DOC, MAX_DOC = 1000, 4000

Unit = tuple[str, str, list[str], str]      # (path, doc key, paragraphs, SPDX licence)
Source = Callable[[str], Iterator[Unit]]    # src folder -> units

# ----------------------------------------------------------------------------
# archive access
# ----------------------------------------------------------------------------

def deb_members(path: str) -> Iterator[tuple[str, bytes]]:
    """Yield (member_path, bytes) for regular files in a .deb's data.tar.*."""
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:8] == b'!<arch>\n', path
    p = 8
    while p < len(data):
        hdr = data[p:p + 60]
        name = hdr[:16].decode().strip().rstrip('/')
        size = int(hdr[48:58].decode().strip())
        body = data[p + 60:p + 60 + size]
        p += 60 + size + (size & 1)
        if name.startswith('data.tar'):
            with tarfile.open(fileobj=io.BytesIO(body), mode='r:*') as tf:
                for m in tf:
                    if m.isfile():
                        yield m.name.lstrip('./'), tf.extractfile(m).read()
            return
    raise ValueError('no data.tar in ' + path)


def sdist_members(path: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, 'r:*') as tf:
        for m in tf:
            if m.isfile():
                yield m.name, tf.extractfile(m).read()


def members(src: str, archive: str, want: Callable[[str], object]) -> Iterator[tuple[str, bytes]]:
    fn = os.path.join(src, archive)
    it = deb_members(fn) if archive.endswith('.deb') else sdist_members(fn)
    for name, b in it:
        if want(name):
            yield name, b

# ----------------------------------------------------------------------------
# R lazy-load database (janeaustenr ships the novels as R character vectors)
# ----------------------------------------------------------------------------

class _RUnserializer:
    def __init__(self, b):
        self.b, self.p, self.refs = b, 0, []

    def int(self):
        v = struct.unpack_from('>i', self.b, self.p)[0]
        self.p += 4
        return v

    def length(self):
        v = self.int()
        if v == -1:
            v = (self.int() << 32) + self.int()
        return v

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xff, flags & (1 << 9), flags & (1 << 10)
        if t == 255:                                   # REFSXP
            k = flags >> 8 or self.int()
            return self.refs[k - 1]
        if t in (254, 253, 252, 251, 250, 242, 241):   # nil/env singletons
            return None
        if t in (249, 248, 247):                       # namespace/package/persist
            self.int()
            v = [self.item() for _ in range(self.int())]
            self.refs.append(v)
            return v
        if t == 1:                                     # SYMSXP
            v = ('sym', self.item())
            self.refs.append(v)
            return v
        if t == 4:                                     # ENVSXP
            e = {}
            self.refs.append(e)
            self.int()
            for _ in range(4):
                self.item()
            return e
        if t in (2, 3, 5, 6, 17, 239, 240):            # pairlist-like
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            return ('pair', tag, self.item(), self.item())
        if t == 9:                                     # CHARSXP
            n = self.int()
            if n == -1:
                return None
            v = self.b[self.p:self.p + n].decode('utf-8', 'replace')
            self.p += n
            return v
        if t in (10, 13):
            n = self.length()
            r = list(struct.unpack_from(f'>{n}i', self.b, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self.length()
            r = list(struct.unpack_from(f'>{n}d', self.b, self.p))
            self.p += 8 * n
        elif t == 15:
            n = self.length()
            self.p += 16 * n
            r = None
        elif t in (16, 19, 20):
            r = [self.item() for _ in range(self.length())]
        elif t == 24:
            n = self.length()
            r = self.b[self.p:self.p + n]
            self.p += n
        elif t == 238:                                 # ALTREP
            return ('altrep', self.item(), self.item(), self.item())
        else:
            raise ValueError(f'unsupported R SEXP type {t}')
        if has_attr:
            self.item()
        return r


def r_unserialize(b: bytes) -> object:
    assert b[:2] == b'X\n', 'only XDR serialization supported'
    u = _RUnserializer(b)
    u.p = 2
    version = u.int()
    u.int()                     # writer's R version
    u.int()                     # minimal R version to read it
    if version == 3:
        n = u.int()             # native encoding name
        u.p += n
    return u.item()


def rdb_objects(data: bytes) -> Iterator[object]:
    """Objects of an R lazy-load .rdb (zlib-compressed entries, in order)."""
    p = 0
    while p < len(data):
        z = zlib.decompressobj()
        raw = z.decompress(data[p + 4:])
        yield r_unserialize(raw)
        p = len(data) - len(z.unused_data)

# ----------------------------------------------------------------------------
# text helpers
# ----------------------------------------------------------------------------

STOP = set('the of and to a in is that it for as with was on be by this are or not '
           'he she his her you i at from which have an but all they we can if has '
           'will one there their been would so no what when do more my me'.split())
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def english_score(text: str) -> float:
    words = WORD.findall(text)
    if len(words) < 30:
        return 0.0
    return sum(w.lower() in STOP for w in words) / len(words)


def ascii_letter_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(c.isascii() for c in letters) / len(letters)


def alpha_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isalpha() for c in chars) / len(chars)


def norm_key(text: str) -> str:
    t = re.sub(r'[^0-9a-z]+', ' ', text.lower())
    return hashlib.sha1(' '.join(t.split()).encode()).hexdigest()


def reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines of one paragraph; keep verse-like short lines."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return ''
    if len(lines) >= 3 and sum(len(ln) < 45 for ln in lines) / len(lines) > 0.7:
        return '\n'.join(lines)
    return re.sub(r' {2,}', ' ', ' '.join(lines))


def split_long(par: str, limit: int = MAX_DOC) -> list[str]:
    """Split a paragraph longer than limit at sentence (or line) boundaries."""
    if len(par) <= limit:
        return [par]
    pieces = re.split(r'(?<=[.!?;:])\s+|\n', par)
    out, cur = [], ''
    for s in pieces:
        if cur and len(cur) + 1 + len(s) > limit:
            out.append(cur)
            cur = s
        else:
            cur = (cur + ' ' + s) if cur else s
    if cur:
        out.append(cur)
    return [o[:limit] for o in out]


def chunk_paragraphs(pars: list[str], lo: int = MIN_DOC, hi: int = MAX_DOC, sep: str = '\n\n') -> list[str]:
    """Greedy paragraph-aligned chunks of lo..hi characters."""
    flat = []
    for p in pars:
        flat.extend(split_long(p, hi))
    chunks, cur, size = [], [], 0
    for p in flat:
        add = len(p) + (len(sep) if cur else 0)
        if cur and size + add > hi:
            chunks.append(cur)
            cur, size = [], 0
            add = len(p)
        cur.append(p)
        size += add
        if size >= lo and size >= (lo + hi) // 2:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        if size < lo and chunks and sum(map(len, chunks[-1])) + size + len(sep) * len(chunks[-1]) <= hi:
            chunks[-1].extend(cur)
        else:
            chunks.append(cur)
    return [sep.join(c) for c in chunks if sum(map(len, c)) >= lo * 0.8]

# ----------------------------------------------------------------------------
# HTML -> paragraphs
# ----------------------------------------------------------------------------

BLOCK = {'p', 'div', 'li', 'dt', 'dd', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'pre',
         'blockquote', 'tr', 'table', 'ul', 'ol', 'dl', 'section', 'article',
         'figure', 'figcaption', 'caption', 'br', 'hr', 'tbody', 'thead'}
VOID = {'br', 'img', 'hr', 'meta', 'link', 'input', 'wbr', 'col', 'area', 'base',
        'source', 'embed', 'param', 'track'}
SKIP_TAGS = {'script', 'style', 'head', 'nav', 'title', 'noscript', 'button', 'form', 'svg'}
SKIP_CLASSES = {'navheader', 'navfooter', 'docnav', 'toc', 'sphinxsidebar', 'related',
                'footer', 'headerlink', 'toctree-wrapper', 'contents', 'list-of-tables',
                'list-of-figures', 'list-of-examples', 'mobile-nav', 'menu-wrapper',
                'inline-search', 'version_switcher_placeholder', 'breadcrumbs',
                'language_switcher_placeholder', 'legalnotice', 'titlepage-legalnotice',
                'revhistory', 'indexterm', 'index', 'authorgroup', 'copyright'}

SKIP_IDS = {'banner', 'title', 'searchbox', 'breadcrumbs'}
TABLE_CLASSES = {'table', 'informaltable', 'table-contents'}


class HTMLText(HTMLParser):
    block, skip_tags, skip_classes, pre_tags = BLOCK, SKIP_TAGS, SKIP_CLASSES, {'pre'}

    def __init__(self, root=None, tables='rows'):
        super().__init__(convert_charrefs=True)
        self.root = root            # (attr, value) that marks the content root
        self.tables = tables        # 'rows' or 'drop'
        self.stack = []             # (tag, skip, is_root)
        self.inside_root = root is None
        self.pre = 0
        self.pars, self.buf = [], []
        self.cells = []

    def skipping(self):
        return any(s for _, s, _ in self.stack)

    def flush(self):
        t = ''.join(self.buf)
        self.buf = []
        if self.pre:
            return
        t = re.sub(r'[ \t\r\n\u00a0]+', ' ', t).strip()
        if t:
            self.pars.append(t)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get('class') or '').split())
        is_root = bool(self.root) and a.get(self.root[0]) == self.root[1]
        skip = (tag in self.skip_tags or bool(classes & self.skip_classes)
                or a.get('id') in SKIP_IDS
                or (self.tables == 'drop' and (tag == 'table' or classes & TABLE_CLASSES))
                or (tag == 'a' and 'headerlink' in classes))
        if tag in self.block and not self.skipping():
            if tag == 'br' and self.pre == 0:
                self.buf.append(' ')
            elif tag == 'br':
                self.buf.append('\n')
            else:
                self.flush()
        if tag in ('td', 'th') and not self.skipping() and self.buf and self.buf[-1] != ' | ':
            if ''.join(self.buf).strip():
                self.buf.append(' | ')
        if tag in VOID:
            return
        if tag in self.pre_tags and not skip:
            self.pre += 1
        self.stack.append((tag, skip, is_root))
        if is_root:
            self.inside_root = True

    def handle_endtag(self, tag):
        if tag in VOID or not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, s, r = self.stack.pop()
            if t in self.pre_tags and not s:
                text = ''.join(self.buf).strip('\n')
                self.buf = []
                self.pre -= 1
                if text.strip() and self.inside_root and not self.skipping():
                    self.pars.append(text.rstrip())
            if r:
                self.flush()
                self.inside_root = False
            if t == tag:
                break
        if tag in self.block and not self.pre:
            self.flush()

    def handle_data(self, data):
        if self.inside_root and not self.skipping():
            self.buf.append(data)

    def close(self):
        super().close()
        self.flush()
        return self.pars


class MallardText(HTMLText):
    """GNOME help (Mallard XML .page) -> paragraphs."""
    block = {'page', 'section', 'title', 'subtitle', 'p', 'item', 'list', 'steps', 'terms',
             'tree', 'note', 'figure', 'media', 'table', 'tr', 'td', 'th', 'screen',
             'synopsis', 'example', 'quote', 'desc', 'links', 'comment', 'listing'}
    skip_tags = {'info', 'comment', 'links', 'media', 'include', 'credit', 'revision',
                 'license', 'if:when', 'if:else', 'its:rules'}
    skip_classes = set()
    pre_tags = {'screen', 'code_block'}


NAV_JUNK = re.compile(r'^(prev|next|up|home|previous topic|next topic|this page|'
                      r'table of contents|contents|navigation|index|modules|'
                      r'report a bug|show source|¶|\|)$', re.I)


def html_paragraphs(raw: bytes, root: tuple[str, str] | None = None, tables: str = 'rows',
                    cls: type[HTMLText] | None = None) -> list[str]:
    text = raw.decode('utf-8', 'replace')
    p = (cls or HTMLText)(root=root, tables=tables)
    p.feed(text)
    pars = p.close()
    out = []
    for par in pars:
        par = par.replace('¶', '').strip()
        if not par or NAV_JUNK.match(par):
            continue
        if '\n' not in par:     # text that followed an inline <pre> (". To start ...")
            par = re.sub(r'^[.,;:]\s+', '', par)
            if len(par) < 2:
                continue
        out.append(par)
    return out

# ----------------------------------------------------------------------------
# roff (man page) -> paragraphs
# ----------------------------------------------------------------------------

ROFF_CHARS = {'em': '—', 'en': '–', 'aq': "'", 'dq': '"', 'lq': '“', 'rq': '”',
              'oq': '‘', 'cq': '’', 'bu': '•', 'co': '©', 'rg': '®', 'mu': '×',
              'ga': '`', 'ti': '~', 'ha': '^', 'rs': '\\', 'hy': '-', 'pl': '+',
              'mi': '-', 'eq': '=', 'lt': '<', 'gt': '>', 'le': '≤', 'ge': '≥',
              'ne': '≠', 'ra': '→', 'la': '←', 'de': '°', 'tm': '™', 'fo': '«',
              'fc': '»', 'Fo': '«', 'Fc': '»', 'sq': '□', 'ba': '|', 'or': '|',
              'br': '|', 'ul': '_', 'dg': '†', 'aa': '´', 'pc': '·', 'sc': '§',
              'ps': '¶', 'R': '®', 'Tm': '™'}


def roff_inline(s: str) -> str:
    s = s.replace('\\\\', '\x00')
    s = re.sub(r'\\".*$', '', s)
    s = re.sub(r'\\f(\[[^\]]*\]|\(..|.)', '', s)
    s = re.sub(r'\\s[+-]?(\d|\(\d\d|\[\d+\])', '', s)
    s = re.sub(r'\\\*(\[([^\]]*)\]|\((..)|(.))',
               lambda m: ROFF_CHARS.get(m.group(2) or m.group(3) or m.group(4), ''), s)
    s = re.sub(r'\\\((..)', lambda m: ROFF_CHARS.get(m.group(1), ''), s)
    s = re.sub(r'\\\[([^\]]*)\]', lambda m: ROFF_CHARS.get(m.group(1), ''), s)
    s = re.sub(r'\\[nwgkz]\(?[A-Za-z.]+', '', s)
    s = re.sub(r'\\[hvlLxXoNbDS]\'[^\']*\'', '', s)
    s = s.replace('\\-', '-').replace('\\e', '\\').replace('\\ ', ' ').replace('\\~', ' ')
    s = s.replace('\\0', ' ')
    s = re.sub(r'\\[&^|,/:%c!)t\n]', '', s)
    s = re.sub(r'\\(.)', r'\1', s)
    return s.replace('\x00', '\\')


def roff_args(s: str) -> list[str]:
    args, cur, q, i = [], '', False, 0
    while i < len(s):
        c = s[i]
        if c == '"':
            if q and i + 1 < len(s) and s[i + 1] == '"':
                cur += '"'
                i += 2
                continue
            q = not q
        elif c in ' \t' and not q:
            if cur:
                args.append(cur)
                cur = ''
        else:
            cur += c
        i += 1
    if cur:
        args.append(cur)
    return args


FONT_MACROS = {'B', 'I', 'SM', 'SB', 'BR', 'RB', 'IR', 'RI', 'BI', 'IB', 'CW', 'R'}

# Pages left out for licence reasons: the BSD-4-Clause family (advertising clause), the older UC
# licence with the same acknowledgement duty (SPDX BSD-4.3TAHOE: resolv.conf.5, mailaddr.7) and the
# 4.4BSD-Lite pages whose "(BSD license)" names no variant (rpc.3, xdr.3, ...).
MAN_EXCLUDED_LICENSE = re.compile(r'(^| )(BSD-4-Clause[-\w.]*|BSD-4\.3TAHOE|BSD-4\.3RENO'
                                  r'|LicenseRef-man-pages-BSD_ONELINE_CDROM)( |$)')
UC_ADVERTISING = re.compile(r'duplicated in all such forms and that any documentation,\s+'
                            r'(\.\\"\s*)?advertising materials')


def man_license(text: str) -> str | None:
    """SPDX expression of a man page: all its SPDX identifiers (AND), else its licence marker."""
    ids = list(dict.fromkeys(re.findall(r'SPDX-License-Identifier:\s*([^\s*]+)', text)))
    if ids:
        return ' AND '.join(ids)
    if UC_ADVERTISING.search(text):
        return 'BSD-4.3TAHOE'
    m = re.search(r'%%%LICENSE_START\(([A-Za-z0-9_]+)\)', text)
    if not m:
        return None
    tag = m.group(1)
    return 'LicenseRef-PublicDomain' if tag == 'PUBLIC_DOMAIN' else f'LicenseRef-man-pages-{tag}'


def man_paragraphs(raw: bytes) -> tuple[list[str] | None, str | None]:
    text = raw.decode('utf-8', 'replace')
    lines = []
    for ln in text.split('\n'):
        if lines and lines[-1] is not None and re.search(r'(?<!\\)(\\\\)*\\$', lines[-1]):
            lines[-1] = lines[-1][:-1] + ln         # roff line continuation
        else:
            lines.append(ln)
    if lines and lines[0].startswith('.so '):
        return None, None
    lic = man_license(text)
    pars, cur, fill, section = [], [], True, ''
    tp = False
    skip_until = None
    drop_sections = {'SEE ALSO', 'COLOPHON', 'AUTHORS', 'AUTHOR', 'REPORTING BUGS',
                     'COPYRIGHT', 'VERSIONS', 'STANDARDS', 'HISTORY', 'CONFORMING TO'}

    def flush():
        nonlocal cur
        if cur and section not in drop_sections:
            body = ('\n'.join(cur) if not fill else ' '.join(cur)).strip()
            body = re.sub(r'[ \t]+', ' ', body) if fill else body
            if body:
                pars.append(body)
        cur = []

    for line in lines:
        if skip_until:
            if line.strip().startswith(skip_until):
                skip_until = None
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line.strip() in ('.', "'"):
            continue
        if line[:1] in '.\'':
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            mac, rest = parts[0], (parts[1] if len(parts) > 1 else '')
            if mac in ('de', 'de1', 'am', 'ig'):
                skip_until = '..'
                continue
            if mac == 'TS':
                flush()
                skip_until = '.TE'
                continue
            if mac in ('if', 'ie', 'el', 'nr', 'ds', 'so', 'mso', 'tr', 'ss', 'cc', 'rm', 'als'):
                if '\\{' in line and '\\}' not in line:
                    skip_until = '.\\}'
                continue
            if mac == 'TH':
                a = roff_args(rest)
                if a:
                    pars.append(f"{roff_inline(a[0])}({a[1] if len(a) > 1 else ''})")
                continue
            if mac in ('SH', 'SS'):
                flush()
                t = roff_inline(' '.join(roff_args(rest))).strip()
                if mac == 'SH':
                    section = t.upper()
                if section not in drop_sections and t:
                    pars.append(t)
                continue
            if mac in ('PP', 'LP', 'P', 'sp', 'HP', 'RS', 'RE', 'in', 'ti'):
                flush()
                continue
            if mac in ('TP', 'TQ'):
                flush()
                tp = True
                continue
            if mac == 'IP':
                flush()
                a = roff_args(rest)
                if a and a[0] not in ('\\(bu', '\\[bu]', '*', '-'):
                    cur.append(roff_inline(a[0]))
                    flush()
                continue
            if mac == 'br':
                if fill:
                    flush()
                continue
            if mac in ('nf', 'EX'):
                flush()
                fill = False
                continue
            if mac in ('fi', 'EE'):
                flush()
                fill = True
                continue
            if mac in FONT_MACROS:
                a = [roff_inline(x) for x in roff_args(rest)]
                joiner = '' if len(mac) == 2 and mac not in ('SM', 'SB', 'CW') else ' '
                cur.append(joiner.join(a))
                if tp:
                    flush()
                    tp = False
                continue
            if mac in ('UR', 'MT'):
                continue
            if mac in ('UE', 'ME'):
                if rest.strip() and cur:
                    cur[-1] += roff_inline(rest.strip())
                continue
            if mac in ('OP',):
                a = [roff_inline(x) for x in roff_args(rest)]
                cur.append('[' + ' '.join(a) + ']')
                continue
            if mac in ('SY',):
                flush()
                cur.append(roff_inline(rest))
                continue
            if mac in ('YS',):
                flush()
                continue
            continue   # unknown request: ignore
        t = roff_inline(line)
        if fill:
            if t.strip():
                cur.append(t.strip())
                if tp:
                    flush()
                    tp = False
        else:
            cur.append(t.rstrip())
    flush()
    return pars, lic

# ----------------------------------------------------------------------------
# per-source extractors: yield (path, doc_key, [paragraphs], license) units
# ----------------------------------------------------------------------------

HEADING = re.compile(r'^(CHAPTER|Chapter|VOLUME|Volume|BOOK|Book)\s+[IVXLC\d]+\.?\s*$'
                     r'|^(CHAPTER|Chapter)\s+[IVXLC\d]+\.?\s*\n.*$'
                     r'|^(THE END|FINIS)$')


def prose_from_lines(lines: list[str]) -> list[list[str]]:
    """Plain-text book lines -> list of sections (lists of paragraphs)."""
    sections, cur, para = [], [], []
    for line in lines + ['']:
        if line.strip():
            para.append(line)
            continue
        if para:
            p = reflow(para)
            para = []
            if HEADING.match(p.strip()) or re.match(r'^(CHAPTER|Chapter)\s+[IVXLC\d]+', p):
                if cur:
                    sections.append(cur)
                cur = []
                continue
            cur.append(p)
    if cur:
        sections.append(cur)
    return sections


def src_austen(src: str) -> Iterator[Unit]:
    for name, b in members(src, 'r-cran-janeaustenr_1.0.0-1_all.deb',
                           lambda n: n.endswith('janeaustenr/data/Rdata.rdb')):
        for obj in rdb_objects(b):
            if not (isinstance(obj, list) and obj and isinstance(obj[0], str)):
                continue
            title = obj[0].strip().title()
            secs = prose_from_lines([x or '' for x in obj])
            for i, sec in enumerate(secs[1:], 1):   # secs[0] = title page
                yield name + '#' + title, f'{title}/{i}', sec, 'LicenseRef-PublicDomain'


def src_alice(src: str) -> Iterator[Unit]:
    for name, b in members(src, 'brotli-1.2.1.tar.gz',
                           lambda n: n.endswith('tests/testdata/alice29.txt')):
        lines = b.decode('latin-1').replace('\r', '').split('\n')
        secs = prose_from_lines(lines)
        for i, sec in enumerate(secs[1:], 1):
            sec = [p for p in sec if not p.strip().startswith('THE END')]
            yield name, f'alice/{i}', sec, 'LicenseRef-PublicDomain'


def src_asyoulik(src: str) -> Iterator[Unit]:
    for name, b in members(src, 'brotli-1.2.1.tar.gz',
                           lambda n: n.endswith('tests/testdata/asyoulik.txt')):
        text = b.decode('latin-1').replace('\r', '')
        start = text.find('\nACT I\n')
        scenes, cur, speech = [], [], None

        def end_speech(into):
            nonlocal speech
            if speech:
                who, ls = speech
                into.append((who + ': ' if who else '') + reflow(ls))
            speech = None

        for line in text[start:].split('\n'):
            if re.match(r'^(ACT|SCENE)\s+[IVX]+', line):
                end_speech(cur)
                if cur:
                    scenes.append(cur)
                cur = []
                continue
            if not line.strip():
                end_speech(cur)
                continue
            m = re.match(r'^([A-Z][A-Z ]+[A-Z])\t+(.*)$', line)
            line = re.sub(r'(?<=\S)\t+', ' ', line)       # tabs inside shared verse lines
            if m:
                end_speech(cur)
                speech = (m.group(1).title(), [re.sub(r'\t+', ' ', m.group(2))])
            elif speech:
                speech[1].append(line.strip())
            else:
                speech = ('', [line.strip()])
        end_speech(cur)
        if cur:
            scenes.append(cur)
        for i, sc in enumerate(scenes):
            # speeches are short: keep them line-separated, one scene per unit
            scene = '\n'.join(sc)
            pars = [scene] if len(scene) <= MAX_DOC else _group_lines(sc)
            yield name, f'asyoulik/{i}', pars, 'LicenseRef-PublicDomain'


def _group_lines(items: list[str], hi: int = MAX_DOC) -> list[str]:
    out, cur = [], []
    for it in items:
        if cur and sum(map(len, cur)) + len(it) > hi * 0.6:
            out.append('\n'.join(cur))
            cur = []
        cur.append(it)
    if cur:
        out.append('\n'.join(cur))
    return out


def src_qa_text(archive: str, pattern: str, license: str) -> Source:
    """Plain-text FAQ ("Q:" / "A:" blocks, hard-wrapped) -> paragraphs."""
    rx = re.compile(pattern)

    def gen(src):
        for name, b in members(src, archive, lambda n: rx.search(n)):
            if name.endswith('.gz'):
                b = gzip.decompress(b)
            pars, para = [], []
            for line in b.decode('utf-8', 'replace').split('\n') + ['']:
                if line.strip():
                    para.append(line)
                elif para:
                    p = reflow(para)
                    para = []
                    if not re.fullmatch(r'[=\-]+', p) and not re.fullmatch(r'[\w .-]+\n[=\-]+', p):
                        pars.append(p)
            yield name, name, pars, license
    return gen


def src_html(archive: str, pattern: str, root: tuple[str, str] | None = None, tables: str = 'rows',
             license: str = '', exclude: str | None = None, cls: type[HTMLText] | None = None) -> Source:
    rx = re.compile(pattern)
    ex = re.compile(exclude) if exclude else None

    def gen(src):
        for name, b in members(src, archive, lambda n: rx.search(n) and not (ex and ex.search(n))):
            pars = html_paragraphs(b, root=root, tables=tables, cls=cls)
            yield name, name, pars, license
    return gen


def src_manpages(src: str) -> Iterator[Unit]:
    for archive in ('manpages_6.03-2_all.deb', 'manpages-dev_6.03-2_all.deb'):
        for name, b in members(src, archive, lambda n: re.search(r'/man/man\d/[^/]+\.gz$', n)):
            pars, lic = man_paragraphs(gzip.decompress(b))
            if not pars or (lic and MAN_EXCLUDED_LICENSE.search(lic)):
                continue
            yield name, name, pars, lic or 'Linux-man-pages-copyleft'


def src_chatterbot(src: str) -> Iterator[Unit]:
    small, small_names, name = [], [], ''
    for name, b in members(src, 'chatterbot_corpus-1.3.3.tar.gz',
                           lambda n: '/data/english/' in n and n.endswith('.yml')):
        convs, cur = [], None
        for line in b.decode('utf-8', 'replace').split('\n'):
            if line.startswith('- - '):
                if cur:
                    convs.append(cur)
                cur = [line[4:].strip()]
            elif line.startswith('  - ') and cur is not None:
                cur.append(line[4:].strip())
            elif line.startswith('    ') and cur:
                cur[-1] += ' ' + line.strip()
            elif not line.startswith(' ') and cur:
                convs.append(cur)
                cur = None
        if cur:
            convs.append(cur)
        seen, out = set(), []
        for c in convs:
            c = [re.sub(r'^([\'"])(.*)\1$', r'\2', x) for x in c]
            key = norm_key(' '.join(c))
            if key in seen:
                continue
            seen.add(key)
            out.append('\n'.join(f"{'A' if i % 2 == 0 else 'B'}: {x}"
                                 for i, x in enumerate(c)))
        # small categories would fall under MIN_DOC on their own: pool them
        if sum(map(len, out)) < MIN_DOC * 1.5:
            small.extend(out)
            small_names.append(os.path.basename(name))
            continue
        yield name, name, out, 'BSD-3-Clause'
    if small:
        yield (os.path.dirname(name) + '/{' + ','.join(small_names) + '}', 'chatterbot/small',
               small, 'BSD-3-Clause')


CODE_EXCLUDE = re.compile(r'/(test|tests|idlelib|encodings|pydoc_data|lib2to3/tests|'
                          r'__phello__|turtledemo)/|_sysconfigdata|/dictionary\.c$')


def src_code(archive: str, pattern: str, license: str) -> Source:
    rx = re.compile(pattern)

    def gen(src):
        for name, b in members(src, archive, lambda n: rx.search(n) and not CODE_EXCLUDE.search(n)):
            try:
                text = b.decode('utf-8')
            except UnicodeDecodeError:
                continue
            text = text.replace('\r\n', '\n')
            if name.endswith('.py'):
                text = text.replace('\t', '    ')
            yield name, name, [text], license
    return gen


def chunk_code(text: str, lo: int = MIN_DOC, hi: int = MAX_DOC) -> list[str]:
    lines = text.split('\n')
    chunks, cur, size = [], [], 0
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ''
        cur.append(line)
        size += len(line) + 1
        indent = len(nxt) - len(nxt.lstrip(' '))
        boundary = (line.strip() == '' and nxt.strip() != '' and indent <= 4
                    and nxt[:1] not in ('\t', ')', ']', '}'))
        soft = line.strip() == ''
        if (size >= lo and boundary) or (size >= hi * 0.8 and soft) or size >= hi:
            chunks.append('\n'.join(cur).strip('\n'))
            cur, size = [], 0
    if cur:
        tail = '\n'.join(cur).strip('\n')
        if chunks and len(chunks[-1]) + len(tail) + 1 <= hi and len(tail) < lo:
            chunks[-1] += '\n\n' + tail
        else:
            chunks.append(tail)
    return [c for c in chunks if len(c) >= lo * 0.8 and len(c) <= hi]

# ----------------------------------------------------------------------------
# domain table
# ----------------------------------------------------------------------------

PYDOC = 'python3.11-doc_3.11.2-6+deb12u9_all.deb'
PYROOT = ('role', 'main')
PY_EXCL = r'(genindex|py-modindex|search|contents|index)\.html$'

DOMAINS = {
    'narrative': [
        ('r-cran-janeaustenr', src_austen, 0.75),
        ('brotli', src_alice, 0.25),
    ],
    'expository': [
        ('debian-handbook', src_html('debian-handbook_11.20220922_all.deb',
                                     r'/html/en-US/[^/]+\.html$', tables='drop',
                                     license='GPL-2.0-or-later OR CC-BY-SA-3.0',
                                     exclude=r'/(index|pr01|appendix.*|ix01)\.html$'), 0.35),
        ('debian-reference-en', src_html('debian-reference-en_2.100_all.deb',
                                         r'/debian-reference/ch\d+\.en\.html$', tables='drop',
                                         license='GPL-2.0-or-later'), 0.30),
        ('python3.11-doc', src_html(PYDOC, r'/html/(howto|tutorial|using|extending|distributing'
                                           r'|installing)/[^/]+\.html$',
                                    root=PYROOT, tables='drop', license='PSF-2.0',
                                    exclude=PY_EXCL), 0.35),
    ],
    'reference': [
        ('python3.11-doc', src_html(PYDOC, r'/html/(library|reference|c-api)/[^/]+\.html$',
                                    root=PYROOT, tables='rows', license='PSF-2.0',
                                    exclude=PY_EXCL), 0.5),
        ('manpages', src_manpages, 0.5),
    ],
    'conversational': [
        ('chatterbot-corpus', src_chatterbot, 0.15),
        ('python3.11-doc', src_html(PYDOC, r'/html/faq/[^/]+\.html$', root=PYROOT,
                                    tables='drop', license='PSF-2.0', exclude=PY_EXCL), 0.25),
        ('brotli', src_asyoulik, 0.15),
        ('gnome-user-docs', src_html('gnome-user-docs_43.0-2_all.deb',
                                     r'^usr/share/help/C/gnome-help/[^/]+\.page$',
                                     license='CC-BY-SA-3.0', cls=MallardText), 0.20),
        ('xz-utils', src_qa_text('xz-utils_5.4.1-1+deb12u2_amd64.deb',
                                 r'/doc/xz-utils/faq\.txt\.gz$', 'LicenseRef-PublicDomain'), 0.02),
    ],
    'code': [
        ('libpython3.11-stdlib', src_code('libpython3.11-stdlib_3.11.2-6+deb12u9_amd64.deb',
                                          r'^usr/lib/python3\.11/.*\.py$', 'PSF-2.0'), 0.35),
        ('libpython3.11-minimal', src_code('libpython3.11-minimal_3.11.2-6+deb12u9_amd64.deb',
                                           r'^usr/lib/python3\.11/.*\.py$', 'PSF-2.0'), 0.25),
        ('click', src_code('click-8.5.1.tar.gz', r'/src/click/.*\.py$', 'BSD-3-Clause'), 0.2),
        ('brotli', src_code('brotli-1.2.1.tar.gz', r'/c/.*\.[ch]$', 'MIT'), 0.2),
    ],
}

PROSE_MIN_EN = {'narrative': 0.30, 'expository': 0.20, 'reference': 0.12, 'conversational': 0.20}


def build_candidates(domain: str, package: str, gen: Source, src: str) -> list[dict]:
    cands = []
    for path, _key, pars, lic in gen(src):
        if domain == 'code':
            chunks = chunk_code(pars[0])
        elif domain == 'conversational' and package in ('chatterbot-corpus', 'brotli', 'xz-utils'):
            chunks = chunk_paragraphs(pars, sep='\n\n')
        else:
            pars = [p for p in pars if len(p) > 1]
            chunks = chunk_paragraphs(pars)
        for c in chunks:
            c = c.strip('\n').rstrip() if domain == 'code' else c.strip()
            if len(c) < MIN_DOC * 0.8:
                continue
            if domain != 'code':
                if english_score(c) < PROSE_MIN_EN[domain] or ascii_letter_share(c) < 0.95:
                    continue
                if alpha_share(c) < (0.45 if domain == 'reference' else 0.6):
                    continue
            else:
                if alpha_share(c) < 0.4:
                    continue
            cands.append({'text': c, 'domain': domain, 'source': f'{package}/{path}',
                          'license': lic})
    return cands

# ----------------------------------------------------------------------------
# near-duplicate detection (MinHash over word 5-gram shingles + LSH)
# ----------------------------------------------------------------------------

NPERM, BANDS = 32, 8
_P = (1 << 61) - 1
_rng = random.Random(12345)
_PERMS = [(_rng.randrange(1, _P), _rng.randrange(0, _P)) for _ in range(NPERM)]


def minhash(text: str) -> tuple[int, ...]:
    w = re.sub(r'[^0-9a-z]+', ' ', text.lower()).split()
    sh = {' '.join(w[i:i + 5]) for i in range(max(1, len(w) - 4))}
    hs = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), 'big') for s in sh]
    return tuple(min((a * h + b) % _P for h in hs) for a, b in _PERMS)


class Dedup:
    def __init__(self, thresh: float = 0.7):
        self.exact, self.norm, self.bands, self.sigs, self.thresh = set(), set(), {}, [], thresh
        self.dropped = {'exact': 0, 'normalized': 0, 'near': 0}

    def add(self, text: str) -> bool:
        e = hashlib.sha1(text.encode()).hexdigest()
        if e in self.exact:
            self.dropped['exact'] += 1
            return False
        n = norm_key(text)
        if n in self.norm:
            self.dropped['normalized'] += 1
            return False
        sig = minhash(text)
        r = NPERM // BANDS
        keys = [(b, sig[b * r:(b + 1) * r]) for b in range(BANDS)]
        cand = set()
        for k in keys:
            cand.update(self.bands.get(k, ()))
        for j in cand:
            if sum(x == y for x, y in zip(sig, self.sigs[j], strict=True)) / NPERM >= self.thresh:
                self.dropped['near'] += 1
                return False
        idx = len(self.sigs)
        self.sigs.append(sig)
        for k in keys:
            self.bands.setdefault(k, []).append(idx)
        self.exact.add(e)
        self.norm.add(n)
        return True

# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--src', default=DEFAULT_SRC,
                    help='folder with the fetched archives (default %(default)s)')
    ap.add_argument('--out', default=str(DEFAULT_OUT), help='output .jsonl.gz (default %(default)s)')
    ap.add_argument('--cap', type=int, default=600_000, help='characters per domain (default %(default)s)')
    ap.add_argument('--seed', type=int, default=20240601)
    args = ap.parse_args(argv)

    dedup = Dedup()          # global: no duplicate across domains either
    out_docs, stats = [], {}
    for domain, sources in DOMAINS.items():
        pools = []
        for package, gen, weight in sources:
            c = build_candidates(domain, package, gen, args.src)
            rnd = random.Random(f'{args.seed}/{domain}/{package}')
            c.sort(key=lambda d: (d['source'], d['text'][:64]))
            rnd.shuffle(c)
            pools.append([package, weight, c, 0, sum(len(d['text']) for d in c)])
            print(f'  candidates {domain:<14} {package:<24} {len(c):6d} docs {pools[-1][4]:9d} chars',
                  file=sys.stderr)
        # quotas proportional to weights; leftovers of short sources flow to the others
        chosen, total = [], 0
        wsum = sum(p[1] for p in pools)      # weights need not add up to 1
        quotas = {p[0] + str(i): args.cap * p[1] / wsum for i, p in enumerate(pools)}
        active = list(range(len(pools)))
        while active and total < args.cap:
            progressed = False
            for i in list(active):
                pkg, _w, c, pos, _ = pools[i]
                qk = pkg + str(i)
                got = sum(len(d['text']) for d in chosen if d['_pool'] == i)
                if got >= quotas[qk] or pos >= len(c):
                    active.remove(i)
                    if pos >= len(c) and got < quotas[qk]:   # redistribute shortfall
                        rest = list(active)
                        sw = sum(pools[j][1] for j in rest) or 1
                        for j in rest:
                            quotas[pools[j][0] + str(j)] += (quotas[qk] - got) * pools[j][1] / sw
                        quotas[qk] = got
                    continue
                d = c[pos]
                pools[i][3] += 1
                if total + len(d['text']) > args.cap * 1.01:
                    continue
                if dedup.add(d['text']):
                    d['_pool'] = i
                    chosen.append(d)
                    total += len(d['text'])
                    progressed = True
            if not progressed and not active:
                break
        per_src = {}
        for d in chosen:
            k = pools[d.pop('_pool')][0]
            per_src.setdefault(k, [0, 0])
            per_src[k][0] += 1
            per_src[k][1] += len(d['text'])
        stats[domain] = {'docs': len(chosen), 'chars': total, 'sources': per_src}
        out_docs.extend(chosen)

    rnd = random.Random(args.seed)
    rnd.shuffle(out_docs)
    lines = [json.dumps({'text': d['text'], 'domain': d['domain'],
                         'source': d['source'], 'license': d['license']},
                        ensure_ascii=False) + '\n' for d in out_docs]
    # mtime=0 and no file name in the gzip header: the same inputs give the same bytes
    data = gzip.compress(''.join(lines).encode('utf-8'), compresslevel=9, mtime=0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'wb') as f:
        f.write(data)
    print(f"{'domain':<15} {'docs':>6} {'chars':>9}")
    for dom, st in stats.items():
        print(f"{dom:<15} {st['docs']:6d} {st['chars']:9d}")
        for k, (n, ch) in st['sources'].items():
            print(f'   {k:<26} {n:5d} {ch:9d}')
    print(f"total           {sum(st['docs'] for st in stats.values()):6d} "
          f"{sum(st['chars'] for st in stats.values()):9d}")
    print('dedup dropped:', dedup.dropped)
    print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes compressed)')
    # the stats go next to the sources, never into the repository
    stats_path = os.path.join(os.path.dirname(os.path.abspath(args.src)), 'mix_stats.json')
    with open(stats_path, 'w') as f:
        json.dump({'stats': stats, 'dedup_dropped': dedup.dropped}, f, indent=1)
    print(f'stats in {stats_path}')


if __name__ == '__main__':
    main()
