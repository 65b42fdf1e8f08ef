/*
 * OpenSearch 3.x: Node's protected constructor takes a descriptor (PluginInfo) for
 * each classpath plugin instead of the class. (Node's public constructor only
 * loads plugins from directories.)
 */
package dev.ferry.engines;

import java.util.Collection;
import java.util.List;
import java.util.stream.Collectors;

import org.opensearch.Version;
import org.opensearch.env.Environment;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.plugins.PluginInfo;

final class EmbeddedNode extends Node {
    EmbeddedNode(Environment env, Collection<Class<? extends Plugin>> plugins) {
        super(env, plugins.stream().map(EmbeddedNode::describe).collect(Collectors.toList()), true);
    }

    private static PluginInfo describe(Class<? extends Plugin> plugin) {
        // name, description, version, OpenSearch version, Java version, class name,
        // custom folder name, extended plugins, has native controller
        return new PluginInfo(plugin.getName(), "classpath module", "NA", Version.CURRENT,
            "21", plugin.getName(), null, List.of(), false);
    }
}
