// The project's one Kafka Connect transform: makes key fields optional, so a hierarchy keeps one key schema.
package cdc.transforms;

import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.apache.kafka.common.cache.Cache;
import org.apache.kafka.common.cache.LRUCache;
import org.apache.kafka.common.cache.SynchronizedCache;
import org.apache.kafka.common.config.AbstractConfig;
import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.connect.connector.ConnectRecord;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaBuilder;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.errors.DataException;
import org.apache.kafka.connect.transforms.Transformation;

/**
 * Makes the named top-level fields of a record's key (or value) optional, values unchanged.
 *
 * <p>Why: a hierarchy's records are keyed by the root id, taken from the root's primary key (never null) and from
 * each member's root-id column (which may be nullable). Connect derives each key schema from the column, so the
 * two would be different schemas with different registry ids, hence different key bytes for the same root id,
 * and the partitioner (which hashes those bytes) would scatter one root's changes. Making the field optional for
 * every table of the hierarchy gives them one schema again. Kafka's own transforms all keep a field's optionality.
 */
public abstract class OptionalFields<R extends ConnectRecord<R>> implements Transformation<R> {

    public static final String FIELDS = "fields";

    private static final ConfigDef CONFIG = new ConfigDef().define(FIELDS, ConfigDef.Type.LIST,
            ConfigDef.NO_DEFAULT_VALUE, ConfigDef.Importance.HIGH, "The fields to make optional.");

    private Set<String> fields;
    private Cache<Schema, Schema> schemas;

    @Override
    public void configure(Map<String, ?> props) {
        List<String> names = new AbstractConfig(CONFIG, props).getList(FIELDS);
        fields = new HashSet<>(names);
        schemas = new SynchronizedCache<>(new LRUCache<>(64));
    }

    @Override
    public R apply(R record) {
        Schema schema = operatingSchema(record);
        Object value = operatingValue(record);
        if (schema == null || schema.type() != Schema.Type.STRUCT) {
            return record; // a truncate's key, a tombstone: nothing to change
        }
        Schema updated = schemas.get(schema);
        if (updated == null) {
            updated = optionalFields(schema);
            schemas.put(schema, updated);
        }
        if (updated == schema) {
            return record;
        }
        Struct out = null;
        if (value != null) {
            if (!(value instanceof Struct)) {
                throw new DataException("OptionalFields: expected a Struct, got " + value.getClass().getName());
            }
            Struct in = (Struct) value;
            out = new Struct(updated);
            for (Field field : schema.fields()) {
                out.put(field.name(), in.get(field));
            }
        }
        return newRecord(record, updated, out);
    }

    private Schema optionalFields(Schema schema) {
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
            if (fields.contains(field.name()) && !fs.isOptional()) {
                builder.field(field.name(), optional(fs));
                changed = true;
            } else {
                builder.field(field.name(), fs);
            }
        }
        return changed ? builder.build() : schema;
    }

    private static Schema optional(Schema s) {
        if (s.type() == Schema.Type.STRUCT || s.type() == Schema.Type.ARRAY || s.type() == Schema.Type.MAP) {
            throw new DataException("OptionalFields: only primitive fields can be made optional, not " + s.type());
        }
        SchemaBuilder b = new SchemaBuilder(s.type()).name(s.name()).version(s.version()).doc(s.doc()).optional();
        if (s.parameters() != null) {
            b.parameters(s.parameters());
        }
        return b.build();
    }

    @Override
    public ConfigDef config() {
        return CONFIG;
    }

    @Override
    public void close() {
    }

    protected abstract Schema operatingSchema(R record);

    protected abstract Object operatingValue(R record);

    protected abstract R newRecord(R record, Schema updatedSchema, Object updatedValue);

    /** On the record key. */
    public static class Key<R extends ConnectRecord<R>> extends OptionalFields<R> {
        @Override
        protected Schema operatingSchema(R record) {
            return record.keySchema();
        }

        @Override
        protected Object operatingValue(R record) {
            return record.key();
        }

        @Override
        protected R newRecord(R record, Schema updatedSchema, Object updatedValue) {
            return record.newRecord(record.topic(), record.kafkaPartition(), updatedSchema, updatedValue,
                    record.valueSchema(), record.value(), record.timestamp(), record.headers());
        }
    }

    /** On the record value. */
    public static class Value<R extends ConnectRecord<R>> extends OptionalFields<R> {
        @Override
        protected Schema operatingSchema(R record) {
            return record.valueSchema();
        }

        @Override
        protected Object operatingValue(R record) {
            return record.value();
        }

        @Override
        protected R newRecord(R record, Schema updatedSchema, Object updatedValue) {
            return record.newRecord(record.topic(), record.kafkaPartition(), record.keySchema(), record.key(),
                    updatedSchema, updatedValue, record.timestamp(), record.headers());
        }
    }
}
