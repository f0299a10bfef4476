// Writes the private keys of PKCS#12 keystores as PEM files (unencrypted PKCS#8), which
// keytool cannot do. kafka.sh makes the test certificates of `up --secure` with keytool
// when openssl is missing, and the Python clients of the tests read PEM keys.
// Run with the JDK's source launcher, in the keystores' directory:
//   java PemKey.java PASSWORD NAME [NAME ...]
// reads the key of alias NAME from NAME.p12 (store and key password PASSWORD) into NAME.key.

import java.io.FileInputStream;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.util.Base64;

public class PemKey {
    public static void main(String[] args) throws Exception {
        char[] password = args[0].toCharArray();
        for (int i = 1; i < args.length; i++) {
            String name = args[i];
            KeyStore store = KeyStore.getInstance("PKCS12");
            try (InputStream in = new FileInputStream(name + ".p12")) {
                store.load(in, password);
            }
            byte[] der = store.getKey(name, password).getEncoded();
            String pem = "-----BEGIN PRIVATE KEY-----\n"
                + Base64.getMimeEncoder(64, new byte[] {'\n'}).encodeToString(der)
                + "\n-----END PRIVATE KEY-----\n";
            Files.write(Path.of(name + ".key"), pem.getBytes(StandardCharsets.US_ASCII));
        }
    }
}
