// iapd status page: renders the state embedded in the page, then follows
// the event stream and fetches the state again when something happens.
"use strict";

(function () {
  var refreshInterval = 3000; // ms between fetches while nothing happens
  var maxEvents = 50;

  function text(value) {
    return document.createTextNode(value === undefined || value === null ? "" : String(value));
  }

  function cell(row, value, className) {
    var td = document.createElement("td");
    td.appendChild(text(value));
    if (className) {
      td.className = className;
    }
    row.appendChild(td);
    return td;
  }

  function fill(tableID, items, columns, emptyText) {
    var body = document.querySelector("#" + tableID + " tbody");
    while (body.firstChild) {
      body.removeChild(body.firstChild);
    }
    if (!items || items.length === 0) {
      var row = body.insertRow();
      var td = cell(row, emptyText, "empty");
      td.colSpan = document.querySelectorAll("#" + tableID + " thead th").length;
      return;
    }
    items.forEach(function (item) {
      var row = body.insertRow();
      row.dataset.name = item.name || item.id;
      columns(row, item);
    });
  }

  function bytes(n) {
    if (n < 1024) {
      return n + " B";
    }
    var units = ["KiB", "MiB", "GiB", "TiB"];
    var i = -1;
    do {
      n /= 1024;
      i++;
    } while (n >= 1024 && i < units.length - 1);
    return n.toFixed(1) + " " + units[i];
  }

  function age(seconds) {
    if (seconds < 60) {
      return Math.floor(seconds) + "s";
    }
    if (seconds < 3600) {
      return Math.floor(seconds / 60) + "m" + Math.floor(seconds % 60) + "s";
    }
    return Math.floor(seconds / 3600) + "h" + Math.floor((seconds % 3600) / 60) + "m";
  }

  function render(state) {
    var st = state.status;
    document.getElementById("summary").textContent =
      st.version + " · up " + age(st.uptime_seconds) + " · policy " + st.policy.path +
      " (" + st.policy.sha256.substring(0, 12) + ") · " + st.connections + " open connection(s)";

    var current = {};
    state.destinations.forEach(function (d) {
      current[d.name] = d.current;
    });

    fill("access-points", state.access_points, function (row, ap) {
      cell(row, ap.name);
      cell(row, ap.device);
      cell(row, ap.usable ? "usable" : "unusable: " + ap.reason, ap.usable ? "usable" : "unusable");
      cell(row, ap.latency_ms === undefined ? "" : ap.latency_ms.toFixed(1) + " ms", "num");
      cell(row, ap.connections, "num");
      cell(row, ap.connections_total, "num");
      cell(row, bytes(ap.bytes_up), "num");
      cell(row, bytes(ap.bytes_down), "num");
      cell(row, ap.dial_failures, "num");
    }, "no access points");

    fill("apps", state.apps, function (row, app) {
      cell(row, app.name);
      cell(row, app.destination);
      var now = current[app.destination];
      cell(row, now ? now : "nothing usable", now ? "usable" : "unusable");
      cell(row, app.connections, "num");
      cell(row, bytes(app.bytes_up), "num");
      cell(row, bytes(app.bytes_down), "num");
      cell(row, app.access_points.map(function (a) {
        return a.access_point + ": " + a.connections_total + " conn, " + bytes(a.bytes_down) + " down";
      }).join("; "));
    }, "no apps");

    fill("destinations", state.destinations, function (row, d) {
      cell(row, d.name + (d.implicit ? " (app binding)" : ""));
      cell(row, d.access_points.join(" → "));
      cell(row, d.current ? d.current : d.reason, d.current ? "usable" : "unusable");
      cell(row, d.apps.join(", "));
    }, "no destinations");

    // Refused and full count clients closed at accept: outside
    // allow_clients, or with the listener at max_connections.
    fill("listeners", st.listeners, function (row, l) {
      row.dataset.name = l.listen;
      cell(row, l.listen);
      cell(row, l.address);
      cell(row, l.protocol);
      cell(row, l.app ? l.app : "users (" + l.user_count + ")");
      cell(row, l.connections, "num");
      cell(row, l.max_connections, "num");
      cell(row, l.clients_refused, "num");
      cell(row, l.full_rejections, "num");
    }, "no listeners");

    fill("dns-listeners", st.dns_listeners, function (row, l) {
      row.dataset.name = l.listen;
      cell(row, l.listen);
      cell(row, l.udp_address === l.tcp_address ? l.udp_address :
        "udp " + l.udp_address + ", tcp " + l.tcp_address);
      cell(row, l.app);
      cell(row, l.queries, "num");
      cell(row, l.queries_refused, "num");
      cell(row, l.queries_failed, "num");
    }, "no DNS listeners (dns_listen)");

    fill("connections", state.connections, function (row, c) {
      cell(row, c.id, "num");
      cell(row, c.app);
      cell(row, c.listener);
      cell(row, c.target);
      cell(row, c.access_point);
      cell(row, c.interface);
      cell(row, bytes(c.bytes_up), "num");
      cell(row, bytes(c.bytes_down), "num");
      cell(row, age(c.age_seconds), "num");
    }, "no open connections");

    fill("interfaces", state.interfaces, function (row, ifc) {
      cell(row, ifc.name);
      cell(row, ifc.index, "num");
      var running = ifc.up && ifc.carrier;
      cell(row, running ? "up" : (ifc.up ? "no carrier" : "down"), running ? "usable" : "unusable");
      cell(row, ifc.addrs.join(", "));
      cell(row, ifc.gateways.join(", "));
      cell(row, (ifc.default || []).join(", "));
    }, "no interfaces");
  }

  function fetchJSON(path) {
    return fetch(path, { cache: "no-store" }).then(function (resp) {
      if (!resp.ok) {
        throw new Error(path + ": " + resp.status);
      }
      return resp.json();
    });
  }

  // At most one refresh runs at a time. A refresh requested while one runs
  // starts once that one ends, because the running one may have read the
  // state before the change behind the request.
  var running = false;
  var again = false;

  function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    again = false;
    Promise.all([
      fetchJSON("/v1/status"),
      fetchJSON("/v1/interfaces"),
      fetchJSON("/v1/access-points"),
      fetchJSON("/v1/destinations"),
      fetchJSON("/v1/apps"),
      fetchJSON("/v1/connections")
    ]).then(function (parts) {
      render({
        status: parts[0], interfaces: parts[1], access_points: parts[2],
        destinations: parts[3], apps: parts[4], connections: parts[5]
      });
    }).catch(function (err) {
      setStream("lost", "state not available: " + err.message);
    }).then(function () {
      running = false;
      if (again) {
        refresh();
      }
    });
  }

  function setStream(state, message) {
    var el = document.getElementById("stream");
    el.dataset.state = state;
    el.textContent = message;
  }

  function describe(e) {
    var parts = [e.kind];
    ["interface", "access_point", "destination", "app"].forEach(function (k) {
      if (e[k]) {
        parts.push(k + "=" + e[k]);
      }
    });
    if (e.kind === "destination_switched") {
      parts.push((e.from || "none") + " → " + (e.to || "none"));
    }
    if (e.count) {
      parts.push("count=" + e.count);
    }
    if (e.reason) {
      parts.push("(" + e.reason + ")");
    }
    return new Date(e.time).toLocaleTimeString() + " " + parts.join(" ");
  }

  function follow() {
    var source = new EventSource("/v1/events");
    source.onopen = function () {
      setStream("live", "live");
    };
    source.onerror = function () {
      setStream("lost", "event stream lost; reconnecting");
    };
    source.onmessage = function (msg) {
      var e = JSON.parse(msg.data);
      var list = document.getElementById("events");
      var li = document.createElement("li");
      li.dataset.kind = e.kind;
      li.appendChild(text(describe(e)));
      list.insertBefore(li, list.firstChild);
      while (list.children.length > maxEvents) {
        list.removeChild(list.lastChild);
      }
      refresh();
    };
  }

  render(JSON.parse(document.getElementById("state").textContent));
  follow();
  setInterval(refresh, refreshInterval);
})();
