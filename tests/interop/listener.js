'use strict';
// Microsoft's Hybrid Connections listener, hyco-https's createRelayedServer, set up
// the way its README and examples/simple/listener.js do, pointed at writeback's
// relay stand-in. Driven by tests/interop/test_hyco_https.py through environment
// variables:
//
//   RELAY_NAMESPACE   host:port of the stand-in (NODE_EXTRA_CA_CERTS trusts its CA)
//   RELAY_PATH        the hybrid connection name
//   RELAY_KEY_NAME    the Listen rule's name, RELAY_KEY its key
//   LISTENER_MODE     "echo": answers what it was sent (below);
//                     "proxy": forwards every request to LISTENER_UPSTREAM (plain
//                     HTTP on loopback, where the test serves writeback's agent),
//                     with the hybrid connection's name cut off the target.
//
// It prints "listening" once the control channel is open, and one line per
// request it served ("served METHOD URL"), so the test can tell which listener
// answered.

const https = require('hyco-https');
const http = require('http');
const crypto = require('crypto');

const ns = process.env.RELAY_NAMESPACE;
const path = process.env.RELAY_PATH;
const keyName = process.env.RELAY_KEY_NAME;
const key = process.env.RELAY_KEY;
const mode = process.env.LISTENER_MODE || 'echo';
const upstream = process.env.LISTENER_UPSTREAM;

// createRelayListenUri(ns, path) writes 'wss://' + ns + ':443/$hc/' + path, which
// cannot name the stand-in's own port; the rest is as the README shows.
const uri = 'wss://' + ns + '/$hc/' + path + '?sb-hc-action=listen';

// The same bytes tests/interop/test_hyco_https.py expects: i % 251.
function pattern(size) {
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i++) out[i] = i % 251;
  return out;
}

function echo(req, res, body) {
  const query = new URL(req.url, 'https://relay.invalid').searchParams;
  const status = parseInt(req.headers['x-status'] || '200', 10);
  res.setHeader('Content-Type', 'application/octet-stream');
  res.setHeader('X-Method', req.method);
  res.setHeader('X-Url', req.url);
  res.setHeader('X-Body-Sha256', crypto.createHash('sha256').update(body).digest('hex'));
  res.setHeader('X-Tags', req.headers['x-tag'] || '');
  res.setHeader('X-Authorization', req.headers['authorization'] || '');
  res.setHeader('X-Relay-Token', req.headers['servicebusauthorization'] ? 'seen' : 'stripped');
  const reason = req.headers['x-reason'];
  if (reason) {
    res.writeHead(status, reason);
  } else {
    res.statusCode = status;
  }
  endWith(res, query.has('size') ? pattern(parseInt(query.get('size'), 10)) : body);
}

// hyco-https sends nothing at all for res.end(<empty buffer>) (its write_ returns
// early before the response preamble), so an empty answer ends with res.end().
function endWith(res, body) {
  if (body.length) {
    res.end(body);
  } else {
    res.end();
  }
}

function proxy(req, res, body) {
  // The target below the hybrid connection, as writeback's agent signs it.
  const prefix = '/' + path;
  let target = req.url;
  if (target.toLowerCase().startsWith(prefix.toLowerCase())) {
    target = target.slice(prefix.length) || '/';
  }
  const headers = Object.assign({}, req.headers);
  delete headers['host'];
  headers['content-length'] = Buffer.byteLength(body);
  const forward = http.request(upstream + target, { method: req.method, headers }, (answer) => {
    const chunks = [];
    answer.on('data', (chunk) => chunks.push(chunk));
    answer.on('end', () => {
      for (const [name, value] of Object.entries(answer.headers)) {
        if (!['content-length', 'connection', 'keep-alive', 'transfer-encoding', 'date'].includes(name)) {
          res.setHeader(name, value);
        }
      }
      res.statusCode = answer.statusCode;
      endWith(res, Buffer.concat(chunks));
    });
  });
  forward.on('error', (err) => {
    res.statusCode = 500;
    res.end('upstream failed: ' + err.message);
  });
  forward.end(body);
}

const server = https.createRelayedServer(
  {
    server: uri,
    token: () => https.createRelayToken(uri, keyName, key),
  },
  (req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(Buffer.from(chunk)));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      console.log('served ' + req.method + ' ' + req.url);
      if (mode === 'proxy') {
        proxy(req, res, body);
      } else {
        echo(req, res, body);
      }
    });
  }
);

server.on('listening', () => console.log('listening'));
server.on('error', (err) => console.error('listener error: ' + (err && err.message)));
server.listen();

process.on('SIGTERM', () => {
  server.close();
  process.exit(0);
});
