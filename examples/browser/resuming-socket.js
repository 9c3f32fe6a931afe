// A browser client for a server link with RECOVERY=true and FORMAT=json: it keeps its session
// across network drops.
function resumingSocket(url, { onMessage, onSession = () => {}, retryMs = 1000 }) {
  let token = null;   // the resume token of the current connection
  let lastSeq = 0;    // the seq of the last message received
  let ws = null;
  let closed = false;

  function open() {
    const target = new URL(url);
    if (token) {
      target.searchParams.set("resume", token);
      target.searchParams.set("last_seq", String(lastSeq));
    }
    const socket = (ws = new WebSocket(target));
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.session) {
        token = frame.session.token;
        if (frame.session.recovered !== true) {
          lastSeq = frame.session.seq; // a new session, or a gap: resync the app's state
        }
        onSession(frame.session);
        return;
      }
      if (typeof frame.seq === "number") {
        // A message missing (its socket failed under it): resume from the last one seen.
        if (frame.seq !== lastSeq + 1) return api.reconnect();
        lastSeq = frame.seq;
      }
      onMessage(frame);
    };
    socket.onclose = (event) => {
      if (closed || socket !== ws) return;
      if (event.code === 4403) token = null; // refused: start a new session
      setTimeout(open, retryMs);
    };
  }

  const api = {
    send(envelope) { ws.send(JSON.stringify(envelope)); },
    // Leave the current socket (the network changed) and resume at once.
    reconnect(newUrl) {
      if (newUrl) url = newUrl;
      const old = ws;
      ws = null;
      old.onclose = null;
      old.onmessage = null;
      old.close(4000, "reconnecting");
      open();
    },
    // End the session for good (a clean close is not resumed).
    close() { closed = true; ws.close(1000, "bye"); },
  };
  open();
  return api;
}
