'use strict';
// A Hybrid Connections sender written the way Microsoft's samples write one
// (hyco-https examples/simple/sender.js and tests/*.test.js): Node's own https
// client, a SAS token from hyco-https's createRelayToken over createRelayHttpsUri,
// in the ServiceBusAuthorization header (or, as createRelayHttpsUri can, in the
// sb-hc-token query parameter). Driven by tests/interop/test_hyco_https.py:
//
//   node sender.js < spec.json > results.json
//
// spec: {namespace: "host:port", path, keyName, key, tokenIn: "header"|"query",
//        keepAlive: bool, requests: [{method, target, headers, body (base64)}]}
// results: [{status, reason, headers, body (base64)}] in order, or {error} for a
// request that failed. With keepAlive the requests share one connection.

const https = require('hyco-https');

function readStdin() {
  return new Promise((resolve) => {
    const chunks = [];
    process.stdin.on('data', (chunk) => chunks.push(chunk));
    process.stdin.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
  });
}

function send(spec, agent, request) {
  return new Promise((resolve) => {
    const [hostname, port] = spec.namespace.split(':');
    const token = https.createRelayToken(
      https.createRelayHttpsUri(spec.namespace, spec.path),
      spec.keyName,
      spec.key
    );
    let path = '/' + spec.path + request.target;
    const headers = Object.assign({}, request.headers || {});
    if (spec.tokenIn === 'query') {
      path += (path.indexOf('?') === -1 ? '?' : '&') + 'sb-hc-token=' + encodeURIComponent(token);
    } else {
      headers['ServiceBusAuthorization'] = token;
    }
    const body = Buffer.from(request.body || '', 'base64');
    headers['Content-Length'] = body.length;
    const req = https.request(
      { hostname, port: parseInt(port, 10), path, method: request.method, headers, agent },
      (res) => {
        const chunks = [];
        res.on('data', (chunk) => chunks.push(chunk));
        res.on('end', () =>
          resolve({
            status: res.statusCode,
            reason: res.statusMessage,
            headers: res.headers,
            body: Buffer.concat(chunks).toString('base64'),
          })
        );
      }
    );
    req.setTimeout(30000, () => req.destroy(new Error('timed out')));
    req.on('error', (err) => resolve({ error: err.message }));
    req.end(body);
  });
}

async function main() {
  const spec = JSON.parse(await readStdin());
  const agent = new https.Agent({ keepAlive: !!spec.keepAlive, maxSockets: 1 });
  const results = [];
  for (const request of spec.requests) {
    results.push(await send(spec, agent, request));
  }
  agent.destroy();
  process.stdout.write(JSON.stringify(results));
}

main();
