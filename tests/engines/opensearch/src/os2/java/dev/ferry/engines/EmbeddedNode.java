/*
 * OpenSearch 2.x: Node's protected constructor takes the classpath plugin classes
 * directly. (Node's public constructor only loads plugins from directories.)
 */
package dev.ferry.engines;

import java.util.Collection;

import org.opensearch.env.Environment;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;

final class EmbeddedNode extends Node {
    EmbeddedNode(Environment env, Collection<Class<? extends Plugin>> plugins) {
        super(env, plugins, true);
    }
}
