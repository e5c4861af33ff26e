// An HTTPS server (HTTP/2 by ALPN, or HTTP/1.1) on a free port of 127.0.0.1, which it prints.
// GET /status/NNN answers NNN; any other path 200.  Usage: go_server CERT KEY
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
)

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		code := 200
		if strings.HasPrefix(r.URL.Path, "/status/") {
			code, _ = strconv.Atoi(r.URL.Path[len("/status/"):])
		}
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(code)
		fmt.Fprintf(w, "%s %s %s\n", r.Proto, r.Method, r.URL.Path)
	})
	fmt.Fprintln(os.Stderr, http.ServeTLS(ln, nil, os.Args[1], os.Args[2]))
	os.Exit(1)
}
