/*
 * FerryNode: one real OpenSearch node, embedded in a plain JVM, for ferry's tests.
 *
 * The server and its standard modules (HTTP transport, reindex, analysis-common,
 * painless) come as jars from Maven Central and sit on the classpath, so no
 * distribution tarball and no Docker are needed. ../../build-opensearch builds
 * this class and writes the classpath file. The one line that differs between
 * OpenSearch 2.x and 3.x, how Node is given the plugin classes, is EmbeddedNode
 * in src/os2 or src/os3.
 *
 * Usage:  java -Xms256m -Xmx512m -cp CLASSPATH dev.ferry.engines.FerryNode --home DIR
 *
 * Contract with the Rust test kit:
 *   - HTTP and transport bind to 127.0.0.1 on ports the OS picks (port 0), so
 *     any number of nodes can run side by side, each with its own --home.
 *   - When the node answers HTTP and cluster health is at least yellow, exactly
 *     one line goes to stdout:  {"url":"http://127.0.0.1:PORT","version":"X.Y.Z"}
 *     Nothing else is ever written to stdout; logs (WARN and up) go to stderr.
 *   - The node shuts down and the JVM exits 0 when stdin reaches EOF (the parent
 *     died or closed the pipe), also while it is still starting; a node that
 *     takes longer than 15 s to close is halted. On SIGTERM it shuts down too
 *     (status 143, as any JVM). --ignore-stdin turns the first off for manual
 *     runs with no stdin; --exit-when-ready exits once ready (the build's
 *     class data sharing training start).
 *   - Bad arguments exit 2; a node that fails to start exits 1 with the error
 *     on stderr.
 */
package dev.ferry.engines;

import java.io.PrintStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import org.opensearch.Version;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;

public final class FerryNode {

    /**
     * Module plugin classes ferry's tests need, each under the names it has had
     * across versions; one name of every module must be on the classpath.
     */
    private static final String[][] MODULES = {
        {"transport-netty4", "org.opensearch.transport.Netty4Plugin", "org.opensearch.transport.Netty4ModulePlugin"},
        {"reindex", "org.opensearch.index.reindex.ReindexPlugin", "org.opensearch.index.reindex.ReindexModulePlugin"},
        {"analysis-common", "org.opensearch.analysis.common.CommonAnalysisPlugin",
            "org.opensearch.analysis.common.CommonAnalysisModulePlugin"},
        {"lang-painless", "org.opensearch.painless.PainlessPlugin", "org.opensearch.painless.PainlessModulePlugin"},
    };

    /** Modules loaded when their build is on the classpath (2.x only: see pom.xml). */
    private static final String[][] OPTIONAL_MODULES = {
        {"ingest-common", "org.opensearch.ingest.common.IngestCommonPlugin"},
    };

    /** How long the node may take to close after stdin's end before the JVM halts. */
    private static final long CLOSE_DEADLINE_SECONDS = 15;

    public static void main(String[] args) {
        try {
            run(args);
        } catch (Throwable t) {
            t.printStackTrace(); // to stderr, see run()
            System.exit(1);
        }
    }

    private static void run(String[] args) throws Exception {
        // Keep the real stdout for the single ready line; anything else goes to stderr.
        PrintStream out = new PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out), true, "UTF-8");
        System.setOut(System.err);

        Path home = null;
        boolean watchStdin = true;
        boolean exitWhenReady = false;
        for (int i = 0; i < args.length; i++) {
            if (args[i].equals("--home") && i + 1 < args.length) {
                home = Path.of(args[++i]).toAbsolutePath();
            } else if (args[i].equals("--ignore-stdin")) {
                watchStdin = false;
            } else if (args[i].equals("--exit-when-ready")) {
                exitWhenReady = true;
            } else {
                System.err.println("usage: FerryNode --home DIR [--ignore-stdin] [--exit-when-ready]");
                System.exit(2);
            }
        }
        if (home == null) {
            System.err.println("usage: FerryNode --home DIR [--ignore-stdin] [--exit-when-ready]");
            System.exit(2);
        }

        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("cluster.name", "ferry-test")
            .put("node.name", "ferry-node")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", "0")
            .put("transport.port", "0")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            // a small heap makes the real-memory breaker trip on bursts of bulk writes
            .put("indices.breaker.total.use_real_memory", false)
            .build();

        List<Class<? extends Plugin>> plugins = new ArrayList<>();
        for (String[] module : MODULES) {
            Class<? extends Plugin> found = null;
            for (int i = 1; i < module.length && found == null; i++) {
                try {
                    found = Class.forName(module[i]).asSubclass(Plugin.class);
                } catch (ClassNotFoundException e) {
                    // the other name of this module is used in this version
                }
            }
            if (found == null) {
                throw new IllegalStateException("module " + module[0] + " is not on the classpath (none of "
                    + String.join(", ", List.of(module).subList(1, module.length)) + "); rebuild with build-opensearch");
            }
            plugins.add(found);
        }
        for (String[] module : OPTIONAL_MODULES) {
            try {
                plugins.add(Class.forName(module[1]).asSubclass(Plugin.class));
            } catch (ClassNotFoundException e) {
                // not built for this version
            }
        }

        // Watch stdin from the start, so a parent that dies while the node is
        // still starting takes the node with it.
        if (watchStdin) {
            Thread watcher = new Thread(FerryNode::exitAtEndOfStdin, "ferry-node-stdin");
            watcher.setDaemon(true);
            watcher.start();
        }

        Environment env = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "ferry-node");
        Node node = new EmbeddedNode(env, plugins);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> close(node), "ferry-node-shutdown"));
        node.start();

        var address = node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress();
        String url = "http://127.0.0.1:" + address.getPort();
        waitForYellow(url);

        out.println("{\"url\":\"" + url + "\",\"version\":\"" + Version.CURRENT + "\"}");
        out.flush();

        if (exitWhenReady) {
            System.exit(0);
        }
        Thread.currentThread().join(); // until stdin ends or SIGTERM
    }

    /** Reads stdin to its end, then exits (the shutdown hook closes the node). */
    private static void exitAtEndOfStdin() {
        byte[] buf = new byte[256];
        try {
            while (System.in.read(buf) != -1) {
                // ignore input; only its end matters
            }
        } catch (java.io.IOException e) {
            // a broken stdin is an end too
        }
        // A node that hangs while closing must not outlive its parent.
        Thread halt = new Thread(() -> {
            try {
                Thread.sleep(TimeUnit.SECONDS.toMillis(CLOSE_DEADLINE_SECONDS));
            } catch (InterruptedException e) {
                return;
            }
            System.err.println("ferry-node: not closed after " + CLOSE_DEADLINE_SECONDS + " s; halting");
            Runtime.getRuntime().halt(1);
        }, "ferry-node-halt");
        halt.setDaemon(true);
        halt.start();
        System.exit(0);
    }

    private static void waitForYellow(String url) throws Exception {
        HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
        HttpRequest req = HttpRequest.newBuilder(URI.create(url + "/_cluster/health?wait_for_status=yellow&timeout=5s"))
            .timeout(Duration.ofSeconds(15))
            .build();
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(120);
        String last = "";
        while (System.nanoTime() < deadline) {
            try {
                HttpResponse<String> resp = http.send(req, HttpResponse.BodyHandlers.ofString());
                if (resp.statusCode() == 200) {
                    return;
                }
                last = resp.statusCode() + " " + resp.body();
            } catch (java.io.IOException e) {
                last = e.toString();
            }
            Thread.sleep(100);
        }
        throw new IllegalStateException("cluster not yellow after 120s: " + last);
    }

    private static void close(Node node) {
        try {
            node.close();
            node.awaitClose(10, TimeUnit.SECONDS);
        } catch (Exception e) {
            System.err.println("ferry-node: error while closing: " + e);
        }
    }
}
