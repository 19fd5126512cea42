// Keeps a hierarchy's keys one schema, and a NULL root id NULL: removes the defaults of a record key's fields.
package cdc.transforms;

import java.util.Map;

import org.apache.kafka.common.cache.Cache;
import org.apache.kafka.common.cache.LRUCache;
import org.apache.kafka.common.cache.SynchronizedCache;
import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.connect.connector.ConnectRecord;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaBuilder;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.errors.DataException;
import org.apache.kafka.connect.transforms.Transformation;

/**
 * Removes the default of every top-level field of a record's key schema, values unchanged, a null kept null.
 *
 * <p>Why: a member of a hierarchy is keyed by its root-id column ({@code message.key.columns}), and Debezium puts
 * that column's DDL default into the key field's schema. The root's key (its primary key) has none, so the two
 * would be different Avro schemas, different registry ids and different key bytes for one root id, which the
 * partitioner hashes apart; and a NULL root id would be read back as the default by the converter's
 * {@code Struct.get} (KAFKA-8713). A key without defaults passes through unchanged (same schema object).
 */
public class DropKeyDefaults<R extends ConnectRecord<R>> implements Transformation<R> {

    private static final ConfigDef CONFIG = new ConfigDef();

    private Cache<Schema, Schema> schemas;

    @Override
    public void configure(Map<String, ?> props) {
        schemas = new SynchronizedCache<>(new LRUCache<>(64));
    }

    @Override
    public R apply(R record) {
        Schema schema = record.keySchema();
        if (schema == null || schema.type() != Schema.Type.STRUCT) {
            return record; // a truncate's key, schemaless keys: nothing to change
        }
        Schema updated = schemas.get(schema);
        if (updated == null) {
            updated = withoutDefaults(schema);
            schemas.put(schema, updated);
        }
        if (updated == schema) {
            return record;
        }
        Struct out = null;
        if (record.key() != null) {
            if (!(record.key() instanceof Struct)) {
                throw new DataException("DropKeyDefaults: expected a Struct, got " + record.key().getClass().getName());
            }
            Struct in = (Struct) record.key();
            out = new Struct(updated);
            for (Field field : schema.fields()) {
                out.put(field.name(), in.getWithoutDefault(field.name()));
            }
        }
        return record.newRecord(record.topic(), record.kafkaPartition(), updated, out, record.valueSchema(),
                record.value(), record.timestamp(), record.headers());
    }

    private static Schema withoutDefaults(Schema schema) {
        boolean changed = false;
        SchemaBuilder builder = SchemaBuilder.struct().name(schema.name()).version(schema.version()).doc(schema.doc());
        if (schema.parameters() != null) {
            builder.parameters(schema.parameters());
        }
        if (schema.isOptional()) {
            builder.optional();
        }
        for (Field field : schema.fields()) {
            Schema fs = field.schema();
            if (fs.defaultValue() != null) {
                if (fs.type() == Schema.Type.STRUCT || fs.type() == Schema.Type.ARRAY || fs.type() == Schema.Type.MAP) {
                    throw new DataException("DropKeyDefaults: key field " + field.name() + " is a " + fs.type()
                            + " with a default; only primitive key fields are supported");
                }
                SchemaBuilder b = new SchemaBuilder(fs.type()).name(fs.name()).version(fs.version()).doc(fs.doc());
                if (fs.parameters() != null) {
                    b.parameters(fs.parameters());
                }
                if (fs.isOptional()) {
                    b.optional();
                }
                fs = b.build();
                changed = true;
            }
            builder.field(field.name(), fs);
        }
        return changed ? builder.build() : schema;
    }

    @Override
    public ConfigDef config() {
        return CONFIG;
    }

    @Override
    public void close() {
    }
}
